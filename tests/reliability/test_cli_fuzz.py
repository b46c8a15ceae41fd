"""A fuzz of the CLI's inputs (issue 15): seed files, configs, LLM URLs and store paths drawn by hypothesis.
Every bad input must end with exit 2, one `error:` line and no traceback, and write nothing.

Kept fast: in-process through typer's CliRunner, a few dozen examples per input, against a fake LLM server
on loopback. URLs only ever name 127.0.0.1/::1 or are malformed, so nothing leaves the machine.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from schemas import BootstrapConfig
from selfinstruct.cli import app
from tasks.round.seeds import DEFAULT_SEEDS, SeedFileError, parse_seed_lines
from tests.support.model_like import ModelLikeFake

runner = CliRunner()
FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SEED_LINE = DEFAULT_SEEDS.read_text().splitlines()[0]

json_fragments = st.sampled_from(
    [
        '{"id": ',
        '"x"',
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        "null",
        "true",
        "1e999",
        '"\\ud800"',
        "\n",
        " ",
        "\xff",
        '"instances": []',
        '"is_classification": "yes"',
        SEED_LINE,
        "[" * 5000,
        "{" * 3000,
    ]
)
text_blobs = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.lists(json_fragments, max_size=12).map("".join),
)


@pytest.fixture(scope="module")
def llm() -> Iterator[str]:
    with ModelLikeFake() as fake:
        yield fake.url


def _fails_cleanly(args: list[str], workdir: Path) -> None:
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before, "something was written"


def _invalid_seeds(text: str) -> bool:
    try:
        parse_seed_lines(text.splitlines(), "fuzz")
    except (SeedFileError, RecursionError):
        return True
    return False


@FUZZ
@given(content=text_blobs)
@example(content=SEED_LINE + "\n" + '{"id": ' + "[" * 100_000)
@example(content="\xff\xfe")
def test_fuzzed_seed_files(llm: str, content: str) -> None:
    assume(_invalid_seeds(content))
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        seeds = workdir / "seeds.jsonl"
        seeds.write_bytes(content.encode("utf-8", "surrogatepass"))
        _fails_cleanly(
            ["run", "--seeds", str(seeds), "--store", str(workdir / "store"), "--llm-url", llm], workdir
        )


config_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
config_keys = st.sampled_from([*BootstrapConfig.model_fields, "unknown"])


@FUZZ
@example(config='{"min_words": 50, "max_words": 10}')
@example(config='{"x": ' + "[" * 100_000)
@given(
    config=st.one_of(
        st.dictionaries(config_keys, config_values, max_size=4).map(json.dumps),
        text_blobs,
    )
)
def test_fuzzed_configs(llm: str, config: str) -> None:
    try:
        data = json.loads(config)
        BootstrapConfig.model_validate(data)
        assume(False)  # a valid config would start a real round
    except (ValueError, ValidationError, RecursionError, TypeError):
        pass
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        path = workdir / "round.json"
        path.write_bytes(config.encode("utf-8", "surrogatepass"))
        _fails_cleanly(
            ["run", "--config", str(path), "--store", str(workdir / "store"), "--llm-url", llm], workdir
        )


hosts = st.sampled_from(["127.0.0.1", "[::1]", "[::1", "127.0.0.1:", "", "user:pw@127.0.0.1", "127.0.0.1:0"])
urls = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda scheme, host, port, path: f"{scheme}{host}{port}{path}",
        st.sampled_from(["http://", "https://", "ftp://", "http:/", "", "s3://"]),
        hosts,
        st.sampled_from(["", ":1", ":99999", ":abc", ":-1"]),
        st.one_of(st.sampled_from(["", "/", "/v2", "/v1/", "/api"]), st.text(max_size=10)),
    ),
)


def _only_loopback(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return True
    return parts.scheme not in ("http", "https") or host in (None, "", "127.0.0.1", "::1")


@FUZZ
@given(url=urls)
@example(url="http://[::1/v1")
@example(url="http://127.0.0.1:99999/v1")
def test_fuzzed_llm_urls(url: str) -> None:
    assume(_only_loopback(url) and url.strip())
    assume(not url.startswith("-"))  # would be read as an option
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        _fails_cleanly(["run", "--store", str(workdir / "store"), "--llm-url", url], workdir)


store_names = st.one_of(
    st.text(min_size=1, max_size=20),
    # S3 URLs only with invalid bucket names: refused before any request
    st.sampled_from(
        ["s3://", "s3://A_B/x", "s3://x", "http://127.0.0.1/store", "file://", "~nouser/x", "\x00"]
    ),
)


@FUZZ
@given(name=store_names, command=st.sampled_from(["status", "verify"]))
@example(name="mistyped", command="verify")
def test_fuzzed_store_paths(name: str, command: str) -> None:
    assume(not name.startswith(("-", "/")) and ".." not in name)  # an option; a path outside the folder
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        target = name if "://" in name else str(workdir / "missing" / name)
        _fails_cleanly([command, "--store", target], workdir)
