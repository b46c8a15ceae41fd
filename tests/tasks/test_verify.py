"""Store verification finds tampered files, duplicate instructions and dangling rounds."""

from pathlib import Path

from schemas import SeedInstance, SeedTask
from tasks.store import Store
from tasks.verify import clean_dangling, verify_store
from tests.support import factories

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
    number = factories.next_round(store)
    records = [factories.instruction(number, i, text) for i, text in enumerate(texts)]
    return factories.commit_round(
        store, records, run_id=f"run-{number - 1}", counts={"kept": len(records)}, pool_size_before=1
    )


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
