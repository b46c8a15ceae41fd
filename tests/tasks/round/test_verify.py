"""Store verification finds tampered files, duplicate instructions and dangling rounds."""

from pathlib import Path

from tasks.resources.store.rounds import Store
from tasks.round.verify import quarantine_dangling, verify_store
from tests.support.factories import SEEDS, commit_texts


def test_clean_store_verifies(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    commit_texts(store, ["List three uses for a paperclip.", "Explain why the sky looks blue."])
    report = verify_store(store, SEEDS)
    assert report.ok, report.problems
    assert (report.rounds_checked, report.instructions) == (1, 2)


def test_tampered_file_and_duplicates_are_problems(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    commit_texts(store, ["List three uses for a paperclip."])
    commit_texts(
        store, ["list three uses  for a PAPERCLIP.", "Write a friendly greeting for a new colleague."]
    )
    report = verify_store(store, SEEDS)
    assert any("duplicates one in round 1" in p for p in report.problems)
    assert any("duplicates one in seeds" in p for p in report.problems)
    path = Path(store.round_dir(1)) / "instructions.parquet"
    path.write_bytes(path.read_bytes() + b"x")
    assert any("round 1: instructions.parquet checksum" in p for p in verify_store(store, SEEDS).problems)


def test_dangling_round_is_reported_and_cleaned_only_when_stale(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    commit_texts(store, ["List three uses for a paperclip."])
    assert store.claim_next_round("live-run") == 2
    report = verify_store(store, SEEDS)
    assert report.ok and report.dangling == [2]
    assert quarantine_dangling(store, [2]) == []  # this process holds the claim: still live
    assert store.round_is_live(2)
    assert quarantine_dangling(store, []) == []
    store.end_claim(2)  # released: now stale, moved aside, never deleted
    [(number, where)] = quarantine_dangling(store, [2])
    assert number == 2 and "/quarantine/round=00002-" in where and Path(where).is_dir()
    assert store.uncommitted_rounds() == []
