"""The one redaction rule for URLs shown anywhere."""

import pytest

from tasks.resources.redact import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@llm.example:8443/v1/?key=s3cret", "https://llm.example:8443/v1"),
        ("http://127.0.0.1:9/v1?api_key=s3cret", "http://127.0.0.1:9/v1"),
        ("http://user@127.0.0.1/v1#s3cret", "http://127.0.0.1/v1"),
        ("http://[::1]:8000/v1?token=s3cret", "http://[::1]:8000/v1"),
        ("http://host:99999/v1?token=s3cret", "http://host/v1"),
        ("s3://user:s3cret@bucket/prefix?key=s3cret", "s3://bucket/prefix"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("file:///tmp/store", "file:///tmp/store"),
        ("data/store", "data/store"),
        ("localhost-8000", "localhost-8000"),
        ("http://[::1/v1?token=s3cret", "<unparseable URL>"),
    ],
)
def test_redact_url_keeps_scheme_host_port_path_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url) and "pw" not in redact_url(url)
