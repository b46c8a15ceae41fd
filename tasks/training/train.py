"""Training a LoRA adapter with TRL's SFTTrainer on a fine-tune's uploaded data (loss on the completion).

torch, transformers, peft, trl and datasets are imported inside the functions that need them, so importing
this module (as the flow and CLI do) stays cheap and generation workers never load the training stack.

What training adds to finetunes/<id>/ (after the dataset folder, before the manifest; see registry.py):

    finetunes/<id>/adapter/...               PEFT adapter and the tokenizer
    finetunes/<id>/training_config.json      every parameter and the resolved base model
    finetunes/<id>/metrics.json              loss curve, validation loss before and after
"""

import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.training import FinetuneMetrics, FinetuneParams, LossPoint
from tasks.publish.progress import ProgressUpdate, report
from tasks.resources.secrets import run_settings
from tasks.resources.store.layout import FINETUNES
from tasks.resources.store.rounds import Store, open_store
from tasks.training.data import load_training_splits
from tasks.training.models import (
    EMBEDDED,
    FinetuneError,
    load_base_model,
    resolve_base_model,
    set_torch_threads,
    stack_versions,
)

PROGRESS_KEY = "finetune"


@dataclass(frozen=True)
class TrainedAdapter:
    """What training produced: its metrics and the files it uploaded (relative to finetunes/<id>/)."""

    metrics: FinetuneMetrics
    files: list[str]


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
