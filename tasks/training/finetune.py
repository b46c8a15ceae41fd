"""LoRA fine-tuning of a small causal LM on the generated data (prompt/completion, loss on the completion).

torch, transformers, peft, trl and datasets are imported inside the functions that need them, so importing
this module (as the flow and CLI do) stays cheap and generation workers never load the training stack.

Store layout of one fine-tune, written in this order (the manifest last, as the marker):

    finetunes/<id>/dataset/...               the Hugging Face dataset folder the adapter was trained on,
                                             built by dataset.py exactly as `selfinstruct export --to`
                                             builds it: README.md (card), data/train-*.parquet and
                                             data/validation-*.parquet (instructions disjoint from train)
    finetunes/<id>/adapter/...               PEFT adapter and the tokenizer
    finetunes/<id>/training_config.json      every parameter and the resolved base model
    finetunes/<id>/metrics.json              loss curve, validation loss before and after
    finetunes/<id>/manifest.json             rounds, rows, checksums: the fine-tune exists from here on
"""

import copy
import importlib.metadata
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
from tasks.publish.progress import ProgressUpdate, report
from tasks.resources.redact import redact_url
from tasks.resources.secrets import run_settings
from tasks.resources.servers.models import embedded_model_path
from tasks.resources.servers.vllm import RUNTIME_LORA_ENV
from tasks.resources.store.layout import FINETUNES
from tasks.resources.store.rounds import Store, open_store
from tasks.training.dataset import DatasetSpec, build_dataset_folder, fingerprint_of_folder
from tasks.training.export import format_rounds

EMBEDDED = "embedded"
DATASET_DIR = "dataset"
TRAINED_COLUMNS = ["prompt", "completion"]
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
    fingerprint: str
    stats: ExportStats
    seeds_sha256: str | None
    files: list[str]


@dataclass(frozen=True)
class TrainedAdapter:
    """What training produced: its metrics and the files it uploaded (relative to finetunes/<id>/)."""

    metrics: FinetuneMetrics
    files: list[str]


# -- base model -----------------------------------------------------------------------------------------


def resolve_base_model(spec: str | None) -> ModelSource:
    """Map a base-model spec to its source.

    Args:
        spec: None or "embedded" (the shipped GGUF), a .gguf file, a folder with a config.json or exactly one
            .gguf file, or a hub id (which needs network access to the hub).
    """
    if spec is None or spec == EMBEDDED:
        try:
            path = embedded_model_path()
        except FileNotFoundError as error:
            raise FinetuneError(str(error)) from None
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


def dataset_spec(params: FinetuneParams) -> DatasetSpec:
    """The dataset folder a fine-tune trains on, in the terms of `selfinstruct export --to`."""
    return DatasetSpec(
        rounds=params.rounds,
        include_seeds=params.include_seeds,
        seeds_path=Path(params.seeds_path) if params.seeds_path else None,
        max_instances=params.max_instances,
        seed=params.seed,
        validation_fraction=params.validation_fraction,
        validation_max_instructions=params.validation_max_instructions,
    )


def upload_training_data(store: Store, finetune_id: str, params: FinetuneParams) -> DataSummary:
    """Build the dataset folder (the export's own code path) and write it under finetunes/<id>/dataset/.

    Raises:
        ExportError: When the rounds are not committed or hold no usable instances.
    """
    base = f"{FINETUNES}/{finetune_id}"
    with tempfile.TemporaryDirectory(prefix="selfinstruct-dataset-") as scratch:
        folder = build_dataset_folder(store, dataset_spec(params), Path(scratch) / DATASET_DIR)
        names = store.put_tree(folder.path, f"{base}/{DATASET_DIR}")
    return DataSummary(
        finetune_id=finetune_id,
        rounds=folder.rounds,
        rows={split: folder.rows.get(split, 0) for split in ("train", "validation")},
        sha256={f"{DATASET_DIR}/{name}": sha for name, sha in folder.files.items()},
        fingerprint=folder.fingerprint,
        stats=folder.stats,
        seeds_sha256=folder.seeds_sha256,
        files=[f"{DATASET_DIR}/{name}" for name in names],
    )


def load_training_splits(
    store: Store, finetune_id: str, scratch: Path, fingerprint: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Download a fine-tune's dataset folder and load it with `datasets.load_dataset`, as a user would.

    Args:
        store: The store holding finetunes/<id>/dataset/.
        finetune_id: The fine-tune.
        scratch: A local folder to download into (and for datasets' cache).
        fingerprint: The data fingerprint recorded when the folder was built; checked when given.

    Returns:
        The prompt/completion rows of the train and validation splits (validation may be empty).

    Raises:
        FinetuneError: When the folder's data files differ from what was recorded.
    """
    import datasets

    folder = scratch / DATASET_DIR
    store.get_tree(f"{FINETUNES}/{finetune_id}/{DATASET_DIR}", folder)
    found = fingerprint_of_folder(folder)
    if fingerprint is not None and found != fingerprint:
        raise FinetuneError(
            f"fine-tune {finetune_id}: dataset files changed since they were built "
            f"(fingerprint {found[:16]}, recorded {fingerprint[:16]})"
        )
    splits = datasets.load_dataset(str(folder), cache_dir=str(scratch / "hf-cache"))
    train = splits["train"].select_columns(TRAINED_COLUMNS).to_list()
    validation = (
        splits["validation"].select_columns(TRAINED_COLUMNS).to_list() if "validation" in splits else []
    )
    return train, validation


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


PROGRESS_KEY = "finetune"


def _progress_callback() -> Any:
    """A Trainer callback that reports steps and the latest loss to the terminal progress display."""
    from transformers import TrainerCallback

    class StepsToProgress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            report(ProgressUpdate(PROGRESS_KEY, done=state.global_step, total=state.max_steps, unit="steps"))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            report(ProgressUpdate(PROGRESS_KEY, done=state.global_step, total=state.max_steps))

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                report(ProgressUpdate(PROGRESS_KEY, note=f"loss {logs['loss']:.4f}"))
            elif logs and "eval_loss" in logs:
                report(ProgressUpdate(PROGRESS_KEY, note=f"validation loss {logs['eval_loss']:.4f}"))

    return StepsToProgress()


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
        trainer.add_callback(_progress_callback())
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
    store: Store,
    finetune_id: str,
    params: FinetuneParams,
    log: Callable[[str], None] | None = None,
    fingerprint: str | None = None,
) -> TrainedAdapter:
    """Train on the dataset folder uploaded for `finetune_id` (checked against `fingerprint` when given);
    upload the adapter, training config and metrics."""
    base = f"{FINETUNES}/{finetune_id}"
    with tempfile.TemporaryDirectory(prefix="selfinstruct-adapter-") as folder:
        train_rows, validation_rows = load_training_splits(store, finetune_id, Path(folder), fingerprint)
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
        dataset_fingerprint=data.fingerprint,
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
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, as `selfinstruct llm serve --engine vllm --enable-lora` does)
    through its POST /v1/load_lora_adapter endpoint.

    Idempotent: vLLM answers 400 "... has already been loaded ..." to a second load under the same name
    (entrypoints/openai/models/serving.py `_check_load_lora_adapter_request`), which is what a retried
    registration whose first answer was lost gets; that counts as success.

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
    if response.status_code == 400 and "has already been loaded" in response.text:
        return
    if response.status_code == 404 and "No adapter found" not in response.text:
        # The route itself is missing: vLLM mounts it only with runtime LoRA updating on.
        raise FinetuneError(
            f"vLLM at {redact_url(root)} has no /v1/load_lora_adapter (404): start it with --enable-lora and "
            f"{RUNTIME_LORA_ENV}=true in its environment (selfinstruct llm serve --engine vllm --enable-lora)"
        )
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


@task(name="prepare-finetune-data", cache_policy=NO_CACHE)
def prepare_data_task(params: FinetuneParams, finetune_id: str) -> DataSummary:
    """Build and upload the train/validation data of a fine-tune."""
    store = open_store(params.store_url, run_settings())
    data = upload_training_data(store, finetune_id, params)
    get_run_logger().info(
        "fine-tune %s: %d train / %d validation rows from rounds %s%s (%d duplicates dropped); "
        "dataset fingerprint %s",
        finetune_id,
        data.rows["train"],
        data.rows["validation"],
        format_rounds(data.rounds),
        " and seeds" if params.include_seeds else "",
        data.stats.duplicates,
        data.fingerprint[:16],
    )
    return data


@task(name="train-adapter", cache_policy=NO_CACHE)
def train_task(params: FinetuneParams, finetune_id: str, fingerprint: str | None = None) -> TrainedAdapter:
    """Train the LoRA adapter on the uploaded dataset folder (checked against `fingerprint`) and upload it."""
    logger = get_run_logger()
    trained = train_from_store(
        open_store(params.store_url, run_settings()),
        finetune_id,
        params,
        log=logger.info,
        fingerprint=fingerprint,
    )
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
    return write_manifest(open_store(params.store_url, run_settings()), params, data, trained)


@task(name="register-adapter-with-vllm", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def register_task(params: FinetuneParams, finetune_id: str) -> str:
    """Load the adapter into the configured vLLM server under the fine-tune's id; returns the path sent."""
    if params.vllm_url is None:
        raise FinetuneError("no vLLM URL configured")
    settings = run_settings()
    path = params.vllm_adapter_path or str(
        local_adapter_copy(open_store(params.store_url, run_settings()), finetune_id)
    )
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
        {"metric": "dataset fingerprint", "value": manifest.dataset_fingerprint},
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
    from tasks.publish.artifacts import store_resource_id
    from tasks.resources.store.rounds import store_root_url

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

    store = open_store(store_url, run_settings())
    create_table_artifact(
        table=metrics_rows(manifest),
        key=METRICS_KEY,
        description=f"Fine-tune {manifest.finetune_id} of {redact_url(store.url)}"
        + (" (dry run: not trained)" if manifest.dry_run else ""),
    )
    emit_event(**finetune_event(store, manifest))
