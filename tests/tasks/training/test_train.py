"""LoRA fine-tuning of the embedded SmolLM2-135M (from its GGUF) on a small test store, for real, on CPU,
and the fine-tune recorded in the store."""

import hashlib
import json

import pytest

from schemas.training import FinetuneManifest, FinetuneMetrics, FinetuneParams
from tasks.publish.events import trained_rounds
from tasks.publish.progress import ProgressUpdate, showing
from tasks.resources.store.rounds import Store
from tasks.training.data import upload_training_data
from tasks.training.models import FinetuneError
from tasks.training.registry import latest_finetune, new_finetune_id, read_finetune_manifest, write_manifest
from tasks.training.train import train_from_store
from tests.support.factories import TRAIN_KNOBS, two_round_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, FinetuneManifest]:
    """One real fine-tune of the embedded model on rounds 1-2 of a test store."""
    store = two_round_store(tmp_path_factory.mktemp("finetune") / "store")
    params = FinetuneParams(store_url=store.url, **TRAIN_KNOBS)
    finetune_id = new_finetune_id()
    data = upload_training_data(store, finetune_id, params)
    lines: list[str] = []
    updates: list[ProgressUpdate] = []
    with showing(updates.append):
        adapter = train_from_store(store, finetune_id, params, log=lines.append, fingerprint=data.fingerprint)
    assert lines[0].startswith("step 1/12: loss ")
    # The terminal display (a TrainerCallback) hears every step and the latest loss.
    assert ProgressUpdate("finetune", done=0, total=12, unit="steps") in updates
    assert sum(1 for u in updates if u.note and u.note.startswith("validation loss ")) == 2  # before, after
    assert [u.done for u in updates if u.done] == list(range(1, 13))
    assert sum(1 for u in updates if u.note and u.note.startswith("loss ")) == 12
    return store, write_manifest(store, params, data, adapter)


def test_training_lowers_the_loss(trained: tuple[Store, FinetuneManifest]) -> None:
    _, manifest = trained
    metrics = manifest.metrics
    assert metrics is not None and metrics.steps == 12 and len(metrics.train_loss_curve) == 12
    assert metrics.eval_loss_before is not None and metrics.eval_loss_after is not None
    assert metrics.eval_loss_after < 0.8 * metrics.eval_loss_before
    curve = [point.loss for point in metrics.train_loss_curve]
    assert sum(curve[-3:]) / 3 < curve[0]
    assert metrics.device == "cpu" and metrics.precision == "float32" and metrics.trainable_parameters > 0


def test_fine_tune_is_recorded_in_the_store(trained: tuple[Store, FinetuneManifest]) -> None:
    store, manifest = trained
    base = f"finetunes/{manifest.finetune_id}"
    assert manifest.rounds == [1, 2] and not manifest.dry_run
    assert manifest.rows["train"] + manifest.rows["validation"] == 25
    train = store.get_bytes(f"{base}/dataset/data/train-00000-of-00001.parquet")
    assert manifest.sha256["dataset/data/train-00000-of-00001.parquet"] == hashlib.sha256(train).hexdigest()
    assert manifest.dataset_fingerprint is not None and len(manifest.dataset_fingerprint) == 64
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
        "training_config.json",
        "metrics.json",
        "dataset/README.md",
        "dataset/data/validation-00000-of-00001.parquet",
    ):
        assert name in manifest.files and store.exists(f"{base}/{name}"), name
    assert not store.exists(f"{base}/adapter/training_args.bin")
    assert json.loads(store.get_bytes(f"{base}/adapter/adapter_config.json"))["r"] == 8
    stored_metrics = FinetuneMetrics.model_validate_json(store.get_bytes(f"{base}/metrics.json"))
    assert stored_metrics == manifest.metrics
    assert read_finetune_manifest(store, manifest.finetune_id) == manifest
    assert trained_rounds(json.loads(store.get_bytes(f"{base}/manifest.json"))) == [1, 2]


def test_dry_run_writes_data_and_manifest_only(trained: tuple[Store, FinetuneManifest]) -> None:
    store, manifest = trained
    params = FinetuneParams(store_url=store.url, rounds=[1], dry_run=True)
    dry_id = new_finetune_id()
    dry = write_manifest(store, params, upload_training_data(store, dry_id, params), None)
    assert dry.dry_run and dry.metrics is None and dry.rounds == [1]
    assert dry.files == [
        "dataset/README.md",
        "dataset/data/train-00000-of-00001.parquet",
        "dataset/data/validation-00000-of-00001.parquet",
    ]
    assert trained_rounds(json.loads(store.get_bytes(f"finetunes/{dry_id}/manifest.json"))) == []
    assert latest_finetune(store) == manifest.finetune_id  # a dry run has nothing to evaluate
    with pytest.raises(FinetuneError, match="no finished fine-tune 'ft-nope'"):
        read_finetune_manifest(store, "ft-nope")
