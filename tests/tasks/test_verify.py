"""Store verification finds tampered files, duplicate instructions and dangling rounds."""

from datetime import UTC, datetime
from pathlib import Path

from schemas import BootstrapConfig, InstructionRecord, RoundManifest, SamplingParams, SeedInstance, SeedTask
from tasks.store import Store, records_to_table
from tasks.verify import clean_dangling, verify_store

SEEDS = [
    SeedTask(
        id="seed_task_0",
        name="greet",
        instruction="Write a friendly greeting for a new colleague.",
        instances=[SeedInstance(input="", output="Welcome aboard!")],
        is_classification=False,
    )
]


def _commit(store: Store, texts: list[str]) -> int:
    number = store.claim_next_round(f"run-{len(store.committed_rounds())}")
    records = [
        InstructionRecord(
            id=f"r{number:05d}-{i:05d}",
            round=number,
            instruction=text,
            request_key="k",
            prompt_index=0,
            in_context_ids=["seed_task_0"],
            model="m",
            sampling=SamplingParams(),
            max_rouge=0.1,
            most_similar=[],
            avg_similarity=0.05,
            is_classification=False,
            classification_raw="No",
        )
        for i, text in enumerate(texts)
    ]
    entry = store.write_table(number, "instructions", records_to_table(records, "instructions"))
    store.commit(
        RoundManifest(
            round=number,
            run_id=f"run-{number - 1}",
            created_at=datetime.now(UTC),
            model="m",
            seeds_sha256="0" * 64,
            pool_size_before=1,
            counts={"kept": len(records)},
            config=BootstrapConfig(),
            files={"instructions.parquet": entry},
        )
    )
    return number


def test_clean_store_verifies(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    _commit(store, ["List three uses for a paperclip.", "Explain why the sky looks blue."])
    report = verify_store(store, SEEDS)
    assert report.ok, report.problems
    assert (report.rounds_checked, report.instructions) == (1, 2)


def test_tampered_file_and_duplicates_are_problems(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    _commit(store, ["List three uses for a paperclip."])
    _commit(store, ["list three uses  for a PAPERCLIP.", "Write a friendly greeting for a new colleague."])
    report = verify_store(store, SEEDS)
    assert any("duplicates one in round 1" in p for p in report.problems)
    assert any("duplicates one in seeds" in p for p in report.problems)
    path = Path(store.round_dir(1)) / "instructions.parquet"
    path.write_bytes(path.read_bytes() + b"x")
    assert any("round 1: instructions.parquet checksum" in p for p in verify_store(store, SEEDS).problems)


def test_dangling_round_is_reported_and_cleaned_only_when_stale(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    _commit(store, ["List three uses for a paperclip."])
    assert store.claim_next_round("live-run") == 2
    report = verify_store(store, SEEDS)
    assert report.ok and report.dangling == [2]
    assert clean_dangling(store, [2]) == []  # this process holds the claim: still live
    assert store.round_is_live(2)
    assert clean_dangling(store, []) == []
