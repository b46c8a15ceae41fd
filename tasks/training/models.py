"""The base model of a fine-tune: where its weights come from, and a fresh float32 copy to train or answer.

torch and transformers are imported inside the functions that load a model, so importing this module stays
cheap. `FinetuneError`, the one-line error of every fine-tuning module, is defined here, at the bottom of
their imports.
"""

import copy
import importlib.metadata
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.resources.servers.models import embedded_model_path

EMBEDDED = "embedded"
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
