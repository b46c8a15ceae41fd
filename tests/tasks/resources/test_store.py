"""The round store on a local folder and on a real S3 endpoint on loopback."""

import io
import json
import multiprocessing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, create_model

from schemas import (
    InstanceRecord,
    RoundManifest,
    Settings,
    SimilarInstruction,
)
from tasks.resources.store.claims import RoundClaimedError
from tasks.resources.store.completions import StoreCompletionCache
from tasks.resources.store.files import StoreError
from tasks.resources.store.records import (
    ADDED_COLUMNS,
    ARROW_SCHEMAS,
    RECORD_FILES,
    arrow_schema,
    records_to_table,
)
from tasks.resources.store.rounds import Store
from tests.support import factories


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    settings: Settings = request.getfixturevalue("s3_settings")
    return Store(settings.store_url, settings)


def _manifest(store: Store, number: int, run_id: str) -> RoundManifest:
    instances = records_to_table([factories.instance("r1", number, input="a", output="b")], "instances")
    entry = store.write_table(number, "instances", instances)
    return factories.manifest(number, run_id, {"instances.parquet": entry}, counts={"kept": 1})


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
    store.fs.pipe_file(store.claims.claim_files(1)[-1], json.dumps({"run_id": "run-b"}).encode())
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
    claims = store.claims.claim_files(1)
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
    record = factories.completion(key="k1", request_id="r", latency_s=0.5, prompt_tokens=3)
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
        ("s3://bucket/x?key=hunter2", "put S3 credentials in settings"),
        ("s3://bucket/x#hunter2", "put S3 credentials in settings"),
    ],
)
def test_bad_store_urls(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as caught:
        Store(url)
    assert "hunter2" not in str(caught.value)


def test_s3_store_with_wrong_credentials_fails_clearly(s3_settings: Settings) -> None:
    from pydantic import SecretStr

    wrong = s3_settings.model_copy(update={"s3_secret_access_key": SecretStr("wrong-secret")})
    store = Store(wrong.store_url, wrong)
    # moto accepts any signature by default, so check that the configured keys are the ones used.
    assert store.fs.key == wrong.s3_access_key_id.get_secret_value()  # type: ignore[union-attr]
    assert "wrong-secret" not in repr(store)


# The schemas of the Parquet files rounds have been written with: derived schemas must stay equal to them.
_SIMILAR = pa.struct([("id", pa.string()), ("instruction", pa.string()), ("score", pa.float64())])
STORED_SCHEMAS = {
    "instructions": pa.schema(
        [
            ("id", pa.string()),
            ("round", pa.int32()),
            ("instruction", pa.string()),
            ("request_key", pa.string()),
            ("prompt_index", pa.int32()),
            ("in_context_ids", pa.list_(pa.string())),
            ("model", pa.string()),
            ("sampling", pa.string()),
            ("max_rouge", pa.float64()),
            ("most_similar", pa.list_(_SIMILAR)),
            ("avg_similarity", pa.float64()),
            ("is_classification", pa.bool_()),
            ("classification_raw", pa.string()),
        ]
    ),
    "instances": pa.schema(
        [
            ("instruction_id", pa.string()),
            ("round", pa.int32()),
            ("index", pa.int32()),
            ("input", pa.string()),
            ("output", pa.string()),
            ("request_key", pa.string()),
        ]
    ),
    "rejected": pa.schema(
        [
            ("round", pa.int32()),
            ("stage", pa.string()),
            ("reason", pa.string()),
            ("text", pa.string()),
            ("instance_input", pa.string()),
            ("instance_output", pa.string()),
            ("request_key", pa.string()),
            ("max_rouge", pa.float64()),
            ("most_similar_instruction", pa.string()),
        ]
    ),
    "requests": pa.schema(
        [
            ("key", pa.string()),
            ("stage", pa.string()),
            ("request_id", pa.string()),
            ("prompt", pa.string()),
            ("text", pa.string()),
            ("finish_reason", pa.string()),
            ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            ("latency_s", pa.float64()),
            ("model", pa.string()),
            ("base_url", pa.string()),
            ("seed", pa.int64()),
        ]
    ),
}


def test_derived_schemas_read_the_files_already_stored() -> None:
    """Files written before a column was added lack exactly the columns ADDED_COLUMNS names, nothing else."""
    assert set(ARROW_SCHEMAS) == set(STORED_SCHEMAS)
    for name, schema in STORED_SCHEMAS.items():
        added = ADDED_COLUMNS.get(name, ())
        older = pa.schema([f for f in ARROW_SCHEMAS[name] if f.name not in added])
        assert older.equals(schema), name


FULL_RECORDS = {
    "instructions": factories.instruction(
        most_similar=[SimilarInstruction(id="seed_task_3", instruction="Name a fruit.", score=0.4)],
        is_classification=True,
    ),
    "instances": factories.instance(input="in", output="out"),
    "rejected": factories.rejection(
        stage="instance",
        instance_input="in",
        instance_output="out",
        request_key="k",
        max_rouge=0.8,
        most_similar_instruction="Name a fruit.",
    ),
    "requests": factories.completion(
        rejected="prompt_too_long", sent_at=1.5, received_at=2.25, cached_prompt_tokens=3
    ),
}


@pytest.mark.parametrize("name", sorted(RECORD_FILES))
def test_every_record_field_survives_a_round_trip(name: str) -> None:
    """A field added to a record gets a column: nothing is silently dropped on the way to Parquet."""
    model = RECORD_FILES[name]
    record = FULL_RECORDS[name]
    assert type(record) is model
    assert [n for n, v in record.model_dump().items() if v is None] == []  # every field really tested
    assert ARROW_SCHEMAS[name].names == list(model.model_fields)
    buffer = io.BytesIO()
    pq.write_table(records_to_table([record], name), buffer)
    row = pq.read_table(io.BytesIO(buffer.getvalue())).to_pylist()[0]
    if name == "instructions":
        row["sampling"] = json.loads(row["sampling"])
    assert model.model_validate(row) == record


def test_a_field_without_a_column_type_is_an_error() -> None:
    class WithSet(BaseModel):
        tags: set[str]

    with pytest.raises(TypeError, match="no Arrow column type"):
        arrow_schema(WithSet)
    extended = create_model("Extended", __base__=InstanceRecord, score=(float | None, None))
    assert arrow_schema(extended).names[-1] == "score"


def test_records_of_another_model_are_refused() -> None:
    with pytest.raises(TypeError, match="InstanceRecord rows only"):
        records_to_table([factories.instruction()], "instances")
