"""A fine-tune's training data: the exported dataset folder, uploaded, read back, checked by fingerprint."""

import hashlib
from pathlib import Path

import pytest

from schemas.training import FinetuneParams
from tasks.resources.store.rounds import Store
from tasks.training.data import dataset_spec, load_training_splits, upload_training_data
from tasks.training.dataset import DatasetSpec, build_dataset_folder
from tasks.training.export import ExportError
from tasks.training.models import FinetuneError
from tests.support.factories import two_round_store


def test_training_data_is_the_exported_dataset_folder(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    params = FinetuneParams(store_url=store.url, rounds=[2], validation_fraction=0.34, seed=5)
    summary = upload_training_data(store, "ft-test", params)
    assert summary.rounds == [2] and summary.seeds_sha256 is None
    assert summary.rows["train"] + summary.rows["validation"] == summary.stats.rows == 11
    assert summary.rows["validation"] > 0
    assert "dataset/README.md" in summary.files
    for name, sha in summary.sha256.items():
        assert hashlib.sha256(store.get_bytes(f"finetunes/ft-test/{name}")).hexdigest() == sha

    # The same folder as `selfinstruct export --to` with the same options: byte for byte.
    exported = build_dataset_folder(store, dataset_spec(params), tmp_path / "export")
    assert exported.fingerprint == summary.fingerprint
    assert {f"dataset/{n}": s for n, s in exported.files.items()} == summary.sha256

    train, validation = load_training_splits(store, "ft-test", tmp_path / "scratch", summary.fingerprint)
    assert (len(train), len(validation)) == (summary.rows["train"], summary.rows["validation"])
    assert all(set(r) == {"prompt", "completion"} for r in train + validation)

    # A shard swapped for a valid shard of another export is caught before training.
    build_dataset_folder(store, DatasetSpec(rounds=[1]), tmp_path / "other")
    other = (tmp_path / "other" / "data" / "train-00000-of-00001.parquet").read_bytes()
    store.put_bytes("finetunes/ft-test/dataset/data/train-00000-of-00001.parquet", other)
    with pytest.raises(FinetuneError, match="dataset files changed since they were built"):
        load_training_splits(store, "ft-test", tmp_path / "scratch2", summary.fingerprint)

    with pytest.raises(ExportError, match=r"rounds 3, 7 are not committed \(committed: 1-2\)"):
        upload_training_data(store, "ft-x", params.model_copy(update={"rounds": [1, 3, 7]}))
    with pytest.raises(ExportError, match="has no committed rounds"):
        upload_training_data(Store(str(tmp_path / "empty")), "ft-y", params)
    assert store.list_names("finetunes") == ["ft-test"]
