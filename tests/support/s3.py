"""A real S3 endpoint on 127.0.0.1 (moto's server mode) for store tests."""

from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from schemas import Settings

ACCESS_KEY = "AKIATESTSELFINSTRUCT"
SECRET_KEY = "test-secret-do-not-leak-7f3a9c"  # grepped for in leak tests


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server listening on loopback for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_settings(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Settings:
    """Settings for a fresh bucket on the loopback S3 endpoint."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"test-{abs(hash(request.node.nodeid)) % 10**10}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    return Settings(
        store_url=f"s3://{bucket}/selfinstruct",
        s3_endpoint_url=s3_endpoint,
        s3_access_key_id=SecretStr(ACCESS_KEY),
        s3_secret_access_key=SecretStr(SECRET_KEY),
    )
