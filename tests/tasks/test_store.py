"""The round store on a local folder and on a real S3 endpoint on loopback."""

import json
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from schemas import BootstrapConfig, CompletionRecord, InstanceRecord, RoundManifest, Settings
from tasks.store import (
    ARROW_SCHEMAS,
    RoundClaimedError,
    Store,
    StoreCompletionCache,
    StoreError,
    records_to_table,
    redact_url,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    settings: Settings = request.getfixturevalue("s3_settings")
    return Store(settings.store_url, settings)


def _manifest(store: Store, number: int, run_id: str) -> RoundManifest:
    instances = records_to_table(
        [InstanceRecord(instruction_id="r1", round=number, index=0, input="a", output="b", request_key="k")],
        "instances",
    )
    entry = store.write_table(number, "instances", instances)
    return RoundManifest(
        round=number,
        run_id=run_id,
        created_at=datetime.now(UTC),
        model="m",
        seeds_sha256="0" * 64,
        pool_size_before=175,
        counts={"kept": 1},
        config=BootstrapConfig(),
        files={"instances.parquet": entry},
    )


def test_round_is_invisible_until_its_manifest_is_written(store: Store) -> None:
    assert store.committed_rounds() == []
    number = store.claim_next_round("run-a")
    assert number == 1
    manifest = _manifest(store, number, "run-a")
    assert store.committed_rounds() == []
    assert store.uncommitted_rounds() == [1]
    with pytest.raises(StoreError, match="not committed"):
        store.read_table(1, "instances")
    store.commit(manifest)
    assert store.committed_rounds() == [1]
    assert store.read_manifest(1).files["instances.parquet"].rows == 1
    assert store.read_table(1, "instances").schema.equals(ARROW_SCHEMAS["instances"])
    assert store.file_checksum(1, "instances.parquet") == manifest.files["instances.parquet"].sha256
    assert store.claim_next_round("run-b") == 2


def test_committed_round_is_immutable(store: Store) -> None:
    number = store.claim_next_round("run-a")
    manifest = _manifest(store, number, "run-a")
    store.commit(manifest)
    store.commit(manifest)  # the same run retrying a write whose response was lost: no error, no change
    other = manifest.model_copy(update={"run_id": "run-b"})
    store.fs.pipe_file(store._claims(1)[-1], json.dumps({"run_id": "run-b"}).encode())
    with pytest.raises(StoreError, match="already committed"):
        store.commit(other)
    assert store.read_manifest(1).run_id == "run-a"
    with pytest.raises(StoreError, match="immutable"):
        store.write_table(1, "instances", ARROW_SCHEMAS["instances"].empty_table())


def test_live_claim_blocks_a_second_run_and_a_dead_one_is_taken_over(store: Store) -> None:
    assert store.claim_next_round("run-a") == 1
    with pytest.raises(RoundClaimedError, match=r"round 1 .* is being written by run run-a"):
        store.claim_next_round("run-b")
    # A claim by a process that has exited on this host is stale: the round is redone under its number.
    child = multiprocessing.get_context("spawn").Process(target=int)
    child.start()
    child.join()
    claims = store._claims(1)
    payload = json.loads(store.fs.cat_file(claims[-1]))
    payload.update(pid=child.pid, run_id="run-dead", attempt=2)
    store.fs.pipe_file(claims[-1].replace("claim-0001", "claim-0002"), json.dumps(payload).encode())
    assert store.claim_next_round("run-c") == 1
    assert store.holds_claim(1, "run-c")
    with pytest.raises(RoundClaimedError, match="no longer holds"):
        store.commit(_manifest(store, 1, "run-a"))


def test_completion_cache_persists_batches(store: Store) -> None:
    store.claim_next_round("run-a")
    cache = StoreCompletionCache(store, 1)
    record = CompletionRecord(
        key="k1",
        stage="instruction",
        request_id="r",
        prompt="p",
        text="t",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        latency_s=0.5,
        model="m",
        base_url="http://127.0.0.1:1/v1",
        seed=1,
    )
    assert cache.get_many(["k1"]) == {}
    cache.put_many([record])
    fresh = StoreCompletionCache(store, 1)
    assert fresh.get_many(["k1", "k2"]) == {"k1": record}


def test_read_committed_concatenates_rounds_in_order(store: Store) -> None:
    for expected in (1, 2):
        number = store.claim_next_round(f"run-{expected}")
        assert number == expected
        store.commit(_manifest(store, number, f"run-{expected}"))
    table = store.read_committed("instances")
    assert table.column("round").to_pylist() == [1, 2]
    assert store.read_committed("instances", rounds=[]).num_rows == 0


def test_round_numbers_and_names_are_validated(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    for bad in (0, -1, 100_000, True):
        with pytest.raises(StoreError, match="round must be an integer"):
            store.round_dir(bad)
    with pytest.raises(StoreError, match="invalid store file name"):
        store.write_table(1, "../../escape", pa.table({"a": [1]}))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unsupported scheme 'ftp'"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://user:hunter2@bucket/x", "put S3 credentials in settings"),
    ],
)
def test_bad_store_urls(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as caught:
        Store(url)
    assert "hunter2" not in str(caught.value)


def test_redact_url() -> None:
    assert redact_url("http://user:pw@127.0.0.1:8000/v1") == "http://***@127.0.0.1:8000/v1"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"


def test_s3_store_with_wrong_credentials_fails_clearly(s3_settings: Settings) -> None:
    from pydantic import SecretStr

    wrong = s3_settings.model_copy(update={"s3_secret_access_key": SecretStr("wrong-secret")})
    store = Store(wrong.store_url, wrong)
    # moto accepts any signature by default, so check that the configured keys are the ones used.
    assert store.fs.key == wrong.s3_access_key_id.get_secret_value()  # type: ignore[union-attr]
    assert "wrong-secret" not in repr(store)
