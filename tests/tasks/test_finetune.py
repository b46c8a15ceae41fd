"""LoRA fine-tuning of the embedded SmolLM2-135M (from its GGUF) on a small test store, for real, on CPU."""

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from schemas.training import FinetuneManifest, FinetuneMetrics, FinetuneParams
from tasks.events import trained_rounds
from tasks.export import ExportError, load_templates
from tasks.finetune import (
    FinetuneError,
    build_training_data,
    latest_finetune,
    load_base_model,
    new_finetune_id,
    read_finetune_manifest,
    read_rows,
    register_with_vllm,
    resolve_base_model,
    train_from_store,
    upload_training_data,
    write_manifest,
)
from tasks.llm_server import embedded_model_path
from tasks.store import Store
from tests.support.factories import TRAIN_KNOBS, two_round_store


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


def test_training_data_is_split_and_checksummed(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    params = FinetuneParams(store_url=store.url, rounds=[2], validation_fraction=0.34, seed=5)
    train, validation, rounds, stats, seeds_sha = build_training_data(store, params)
    assert rounds == [2] and seeds_sha is None
    train_rows, validation_rows = read_rows(train), read_rows(validation)
    assert len(train_rows) + len(validation_rows) == stats.rows == 11
    assert validation_rows and all(set(r) == {"prompt", "completion"} for r in train_rows + validation_rows)

    summary = upload_training_data(store, "ft-test", params)
    assert store.get_bytes("finetunes/ft-test/data/train.jsonl") == train
    assert summary.sha256["train"] == hashlib.sha256(train).hexdigest()
    assert summary.rows == {"train": len(train_rows), "validation": len(validation_rows)}

    with pytest.raises(ExportError, match=r"rounds 3, 7 are not committed \(committed: 1-2\)"):
        build_training_data(store, params.model_copy(update={"rounds": [1, 3, 7]}))
    with pytest.raises(ExportError, match="has no committed rounds"):
        build_training_data(Store(str(tmp_path / "empty")), params)


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
    adapter = train_from_store(store, finetune_id, params, log=lines.append)
    assert lines[0].startswith("step 1/12: loss ")
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
    train = store.get_bytes(f"{base}/data/train.jsonl")
    assert manifest.sha256["train"] == hashlib.sha256(train).hexdigest()
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
        "training_config.json",
        "metrics.json",
        "data/validation.jsonl",
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
    assert dry.files == ["data/train.jsonl", "data/validation.jsonl"]
    assert trained_rounds(json.loads(store.get_bytes(f"finetunes/{dry_id}/manifest.json"))) == []
    assert latest_finetune(store) == manifest.finetune_id  # a dry run has nothing to evaluate
    with pytest.raises(FinetuneError, match="no finished fine-tune 'ft-nope'"):
        read_finetune_manifest(store, "ft-nope")


@pytest.fixture
def lora_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback server speaking vLLM's runtime LoRA endpoint (vLLM itself needs CUDA, absent here)."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            if self.path != "/v1/load_lora_adapter":
                self.send_response(404)
            elif body["lora_name"] in {r["body"]["lora_name"] for r in received[:-1]}:
                self.send_response(400)  # vLLM refuses a name that is already loaded
            else:
                self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok" if self.path == "/v1/load_lora_adapter" else b"not found")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_register_with_vllm(lora_server: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = lora_server
    register_with_vllm(f"{url}/v1", "ft-a", "/adapters/ft-a", api_key="secret")
    register_with_vllm(url, "ft-b", "/adapters/ft-b")
    assert [r["body"] for r in received] == [
        {"lora_name": "ft-a", "lora_path": "/adapters/ft-a"},
        {"lora_name": "ft-b", "lora_path": "/adapters/ft-b"},
    ]
    assert received[0]["auth"] == "Bearer secret" and received[1]["auth"] is None
    with pytest.raises(FinetuneError, match="refused adapter ft-a: 400"):
        register_with_vllm(url, "ft-a", "/adapters/ft-a")
    with pytest.raises(FinetuneError, match=r"vLLM at http://127\.0\.0\.1:1/v1"):
        register_with_vllm("http://127.0.0.1:1", "ft-c", "/x", timeout_s=2)
