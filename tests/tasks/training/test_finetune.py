"""LoRA fine-tuning of the embedded SmolLM2-135M (from its GGUF) on a small test store, for real, on CPU."""

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.training import FinetuneManifest, FinetuneMetrics, FinetuneParams
from tasks.publish.events import trained_rounds
from tasks.publish.progress import ProgressUpdate, showing
from tasks.resources.servers.models import embedded_model_path
from tasks.resources.store.rounds import Store
from tasks.training.dataset import DatasetSpec, build_dataset_folder
from tasks.training.export import ExportError, load_templates
from tasks.training.finetune import (
    FinetuneError,
    dataset_spec,
    latest_finetune,
    load_base_model,
    load_training_splits,
    new_finetune_id,
    read_finetune_manifest,
    register_with_vllm,
    resolve_base_model,
    train_from_store,
    upload_training_data,
    write_manifest,
)
from tests.support.factories import TRAIN_KNOBS, two_round_store
from tests.support.fake_openai import FakeOpenAI, VLLMMode


def test_base_model_specs(tmp_path: Path) -> None:
    embedded = resolve_base_model(None)
    assert embedded == resolve_base_model("embedded")
    shipped = embedded_model_path()  # the same file the embedded llama.cpp server loads
    assert embedded.gguf_file == shipped.name and Path(embedded.location) == shipped.parent
    assert resolve_base_model(str(shipped)) == embedded
    single = tmp_path / "one-gguf"
    single.mkdir()
    (single / "model.Q8_0.gguf").write_bytes(b"")
    assert resolve_base_model(str(single)).gguf_file == "model.Q8_0.gguf"
    (single / "config.json").write_text("{}")
    assert resolve_base_model(str(single)).gguf_file is None  # a transformers folder wins
    assert (
        resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct").location
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(FinetuneError, match="no such file or folder"):
        resolve_base_model(str(tmp_path / "missing.gguf"))


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


def test_every_template_prompt_is_a_token_prefix_of_prompt_plus_answer() -> None:
    # Otherwise TRL cannot separate prompt from completion cleanly and the model trains on a shifted context.
    _, tokenizer = load_base_model(None)
    for template in load_templates():
        for prompt in (template.render("Name the capital.", "France"), template.render("Name a fruit.", "")):
            alone = tokenizer(prompt)["input_ids"]
            assert tokenizer(prompt + "Paris is the answer")["input_ids"][: len(alone)] == alone, (
                template.name
            )


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


def _adapter(folder: Path, rank: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(folder)


def test_register_with_vllm_is_idempotent(tmp_path: Path) -> None:
    """Finding 1: a retried registration gets vLLM's 400 "already been loaded", which is success."""
    with FakeOpenAI(vllm=VLLMMode(runtime_lora_updating=True), api_key="secret") as fake:
        register_with_vllm(fake.url, "ft-a", _adapter(tmp_path / "a", 8), api_key="secret")
        register_with_vllm(
            fake.url.removesuffix("/v1"), "ft-a", _adapter(tmp_path / "a", 8), api_key="secret"
        )
        assert fake.adapters == {"ft-a": str(tmp_path / "a")}
        with pytest.raises(FinetuneError, match=r"refused adapter ft-b: 500.*greater than max_lora_rank 16"):
            register_with_vllm(fake.url, "ft-b", _adapter(tmp_path / "b", 32), api_key="secret")
        with pytest.raises(FinetuneError, match=r"refused adapter ft-c: 404.*No adapter found"):
            register_with_vllm(fake.url, "ft-c", str(tmp_path / "missing"), api_key="secret")
    with pytest.raises(FinetuneError, match=r"vLLM at http://127\.0\.0\.1:1/v1"):
        register_with_vllm("http://127.0.0.1:1", "ft-c", "/x", timeout_s=2)


def test_register_with_a_vllm_without_runtime_lora_says_how_to_start_it(tmp_path: Path) -> None:
    with (
        FakeOpenAI(vllm=VLLMMode(runtime_lora_updating=False)) as fake,
        pytest.raises(FinetuneError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"),
    ):
        register_with_vllm(fake.url, "ft-a", _adapter(tmp_path / "a", 8))


def test_lora_rank_is_checked_against_the_servers_limit_before_training() -> None:
    """Finding 4: vLLM refuses an adapter above its --max-lora-rank; find out before training, not after."""
    with pytest.raises(ValidationError, match=r"lora_r=32 is above the vLLM server's max LoRA rank \(16\)"):
        FinetuneParams(vllm_url="http://127.0.0.1:8000/v1", lora_r=32)
    assert FinetuneParams(vllm_url="http://127.0.0.1:8000/v1", lora_r=32, vllm_max_lora_rank=64).lora_r == 32
    assert FinetuneParams(lora_r=32).lora_r == 32  # nothing to register with, nothing to check
