"""Credentials from Prefect Secret blocks on a real Prefect server, with environment variables still first."""

import contextlib
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from schemas import Settings
from tasks.resources.secrets import SECRET_BLOCK_FIELDS, run_settings
from tasks.resources.store.rounds import Store
from tests.support.s3 import ACCESS_KEY, SECRET_KEY


@pytest.fixture
def blocks(prefect_server: None, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Block names unique to the test (the server is shared by the session); deleted afterwards."""
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    suffix = abs(hash(request.node.nodeid)) % 10**8
    names = {field: f"test-{field.replace('_', '-')}-{suffix}" for field in SECRET_BLOCK_FIELDS}
    yield names
    for name in names.values():
        with contextlib.suppress(ValueError, ObjectNotFound):  # never saved
            Secret.delete(name, _sync=True)  # type: ignore[call-arg]


def _settings(names: dict[str, str], **fields: object) -> Settings:
    named = {f"{field}_block": name for field, name in names.items()}
    return Settings(**(named | fields))  # type: ignore[arg-type]


def _save(name: str, value: str) -> None:
    from prefect.blocks.system import Secret

    Secret(value=SecretStr(value)).save(name, overwrite=True, _sync=True)  # type: ignore[call-arg]


def test_without_blocks_nothing_is_filled(blocks: dict[str, str]) -> None:
    settings = run_settings(_settings(blocks))
    assert settings.api_key is None and settings.s3_access_key_id is None
    assert run_settings(_settings(blocks, api_key_block=None)).api_key is None


def test_blocks_fill_what_the_environment_left_empty(blocks: dict[str, str]) -> None:
    _save(blocks["api_key"], "key-from-block")
    _save(blocks["s3_access_key_id"], ACCESS_KEY)
    settings = run_settings(_settings(blocks))
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "key-from-block"
    assert settings.s3_access_key_id is not None
    assert settings.s3_access_key_id.get_secret_value() == ACCESS_KEY
    assert settings.s3_secret_access_key is None  # that block does not exist
    assert "key-from-block" not in repr(settings)
    # The environment wins over a block.
    from_env = run_settings(_settings(blocks, api_key=SecretStr("key-from-env")))
    assert from_env.api_key is not None and from_env.api_key.get_secret_value() == "key-from-env"


def test_an_s3_store_opens_with_credentials_from_blocks_only(
    blocks: dict[str, str], s3_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    bare = _settings(blocks, store_url=s3_settings.store_url, s3_endpoint_url=s3_settings.s3_endpoint_url)
    with pytest.raises(Exception, match=r"(?i)credentials"):
        Store(bare.store_url, run_settings(bare)).put_bytes("state/probe", b"x")
    _save(blocks["s3_access_key_id"], ACCESS_KEY)
    _save(blocks["s3_secret_access_key"], SECRET_KEY)
    store = Store(bare.store_url, run_settings(bare))
    store.put_bytes("state/probe", b"written with credentials from Prefect Secret blocks")
    assert store.get_bytes("state/probe").startswith(b"written")
