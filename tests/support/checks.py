"""The store checks every reliability test ends with."""

from __future__ import annotations

from tasks.resources.store.rounds import Store
from tasks.round.seeds import load_seeds
from tasks.round.verify import VerifyReport, verify_store


def assert_store_sound(store: Store) -> VerifyReport:
    """What every reliability test ends with.

    Every committed round passes verification (files match the manifest, counts match the files), no
    instruction appears twice in the pool (seeds included), and only rounds with a manifest are listed.
    """
    seeds, _ = load_seeds()
    report = verify_store(store, seeds)
    assert report.ok, report.problems
    committed = store.committed_rounds()
    for number in committed:
        assert store.fs.exists(f"{store.round_dir(number)}/manifest.json")
        for name, entry in store.read_manifest(number).files.items():
            assert store.file_checksum(number, name) == entry.sha256, (number, name)
    texts = [
        " ".join(t.lower().split())
        for t in store.read_committed("instructions").column("instruction").to_pylist()
    ]
    texts += [" ".join(t.instruction.lower().split()) for t in seeds]
    assert len(texts) == len(set(texts)), "an instruction appears twice in the pool"
    assert not set(committed) & set(store.uncommitted_rounds())
    return report
