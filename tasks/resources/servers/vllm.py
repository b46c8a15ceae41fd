"""vLLM's OpenAI-compatible server (GPU): the `vllm serve` command line with the limits rounds need."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from tasks.resources.servers.models import GEMMA3, SMOLLM2

# What the short names of the llama.cpp models are on the Hugging Face Hub, for vLLM (which loads the
# original weights, not the GGUF files).
VLLM_MODEL_IDS = {
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",
    GEMMA3: "google/gemma-3-270m",
}
# vLLM 0.33.0 accepts only these for --max-lora-rank (config/lora.py `MaxLoRARanks`; default 16).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Without this in the server's environment vLLM does not mount /v1/load_lora_adapter at all
# (entrypoints/serve/lora/api_router.py `attach_router`), so registering a fine-tune answers 404.
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
# A round's classification and instance prompts share long few-shot prefixes. Automatic prefix caching is on
# by default in vLLM's V1 engine (config/cache.py `CacheConfig.enable_prefix_caching: bool = True`), but the
# engine may turn it off for some models; asking for it says what rounds rely on. Usage reports the cached
# prompt tokens (usage.prompt_tokens_details.cached_tokens, recorded in requests.parquet) only with
# --enable-prompt-tokens-details (entrypoints/openai/cli_args.py, default False).
PREFIX_CACHE_FLAGS = ("--enable-prefix-caching", "--enable-prompt-tokens-details")


@dataclass(frozen=True)
class VLLMServe:
    """A `vllm serve` invocation: what to load, how clients name it, and the limits that matter to rounds.

    Attributes:
        model: Hugging Face model id or local folder; the short names of the embedded models
            (smollm2-135m-instruct, gemma3-270m) stand for their Hub ids.
        served_model_name: The name requests use; None = the short name when one was given, else vLLM's
            default (the model id itself).
        enable_lora: Allow LoRA adapters, and loading them at runtime (fine-tunes register themselves).
        max_lora_rank: Biggest adapter rank the server accepts; None = vLLM's 16.
        max_loras: Adapters in one batch at once; None = vLLM's 1.
        max_num_seqs: Sequences scheduled at once; None = vLLM's default for the GPU.
        max_model_len: Context length; None = the model's.
        generation_config: "vllm" (default): ignore the model's generation_config.json, so that fields a
            request leaves out get vLLM's neutral defaults; "auto" applies the model's file.
        tensor_parallel_size: GPUs to shard the model over.
        gpu_memory_utilization: Fraction of GPU memory vLLM may take.
        extra: Further `vllm serve` arguments, passed through as given.
    """

    model: str
    served_model_name: str | None = None
    enable_lora: bool = False
    max_lora_rank: int | None = None
    max_loras: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    generation_config: str = "vllm"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    extra: tuple[str, ...] = ()

    def model_id(self) -> str:
        """What `vllm serve` loads."""
        return VLLM_MODEL_IDS.get(self.model, self.model)

    def served_name(self) -> str:
        """The model name clients must send (SELFINSTRUCT_MODEL)."""
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.model in VLLM_MODEL_IDS else self.model_id()

    def command(self, port: int, host: str = "127.0.0.1") -> list[str]:
        """The `vllm serve` command line."""
        cmd = ["vllm", "serve", self.model_id(), "--host", host, "--port", str(port)]
        if self.served_name() != self.model_id():
            cmd += ["--served-model-name", self.served_name()]
        cmd += [
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--gpu-memory-utilization",
            f"{self.gpu_memory_utilization:g}",
            "--generation-config",
            self.generation_config,
            *PREFIX_CACHE_FLAGS,
        ]
        for flag, value in (
            ("--max-num-seqs", self.max_num_seqs),
            ("--max-model-len", self.max_model_len),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        if self.enable_lora:
            cmd.append("--enable-lora")
            for flag, value in (("--max-lora-rank", self.max_lora_rank), ("--max-loras", self.max_loras)):
                if value is not None:
                    cmd += [flag, str(value)]
        return [*cmd, *self.extra]

    def environment(self) -> dict[str, str]:
        """Variables the server needs on top of the caller's environment."""
        return {RUNTIME_LORA_ENV: "true"} if self.enable_lora else {}


def vllm_command(
    model: str,
    port: int,
    tensor_parallel_size: int = 1,
    enable_lora: bool = False,
    gpu_memory_utilization: float = 0.9,
    extra: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> list[str]:
    """The `vllm serve` command line with defaults for everything but these (see `VLLMServe`)."""
    serve = VLLMServe(
        model,
        enable_lora=enable_lora,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        extra=tuple(extra),
    )
    return serve.command(port, host)


def vllm_available() -> bool:
    """True when vLLM is installed here (the `vllm` module and its console script)."""
    return importlib.util.find_spec("vllm") is not None and shutil.which("vllm") is not None
