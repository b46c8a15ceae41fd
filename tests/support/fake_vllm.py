"""The vLLM 0.33.0 rules the fake OpenAI server enforces in vLLM mode (`FakeOpenAI(vllm=VLLMMode(...))`).

Each rule names the vLLM source it copies, read from the wheel since vLLM cannot run without CUDA: the
stop-string limit, the context limit, the request-queue limit (503), the /metrics gauges, runtime LoRA
loading, and the sampling defaults applied to fields a request leaves out. Also the fake tokenizer and
vLLM's error body, which the fake server shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass
class VLLMMode:
    """The vLLM 0.33.0 server behaviour the stand-in copies, with vLLM's defaults unless a test changes them.

    Attributes:
        max_model_len: `--max-model-len`, in fake tokens (words). A prompt of at least this many tokens is a
            400 for the whole request (renderers/params.py `TokenizeParams._token_len_check`, and
            v1/engine/input_processor.py for a prompt of exactly this length); `max_tokens` above it is a 400
            (`TokenizeParams.__post_init__`); otherwise `max_tokens` is clamped to what is left of the context
            (entrypoints/serve/utils/api_utils.py `get_max_tokens`).
        max_stop_strings: `VLLM_MAX_STOP_STRINGS` (envs.py, default 4); more stop strings are a 400
            (entrypoints/generate/base/protocol.py `StopParam`).
        max_num_seqs: `--max-num-seqs`: prompts the scheduler runs at once; the rest wait. Reported by
            GET /metrics as `vllm:num_requests_running` / `vllm:num_requests_waiting` (v1/metrics/loggers.py).
        max_num_queued_reqs: `--max-num-queued-reqs`: with it set, a request that would take the unfinished
            prompts over it gets 503 (v1/engine/async_llm.py `check_admission`, exceptions.py
            `QueueOverflowError`). None: no limit, vLLM's default, and requests simply wait.
        runtime_lora_updating: `VLLM_ALLOW_RUNTIME_LORA_UPDATING=true` in the server's environment: only then
            are /v1/load_lora_adapter and /v1/unload_lora_adapter mounted
            (entrypoints/serve/lora/api_router.py).
        max_lora_rank: `--max-lora-rank` (config/lora.py, default 16); a bigger adapter fails to load
            (lora/peft_helper.py `validate_legal`).
        generation_config: The model's generation_config.json sampling defaults, which vLLM applies to every
            field a request leaves out (`--generation-config auto`, the default; completion/protocol.py
            `to_sampling_params`); empty = `--generation-config vllm`.
    """

    max_model_len: int = 2048
    max_stop_strings: int = 4
    max_num_seqs: int = 256
    max_num_queued_reqs: int | None = None
    runtime_lora_updating: bool = False
    max_lora_rank: int = 16
    generation_config: dict[str, float] = field(default_factory=dict)


# vLLM's own defaults for sampling fields a request leaves out and the model's generation config does not set
# (entrypoints/openai/completion/protocol.py `CompletionRequest._DEFAULT_SAMPLING_PARAMS`).
VLLM_SAMPLING_DEFAULTS: dict[str, float] = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}


def words(text: str) -> list[str]:
    """The fake tokenizer: whitespace-separated words."""
    return text.split()


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> web.Response:
    # vLLM's ErrorResponse (entrypoints/serve/engine/protocol.py): {"error": {message, type, param, code}}.
    payload = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(payload, status=status, headers=headers)


def metrics_text(limits: VLLMMode, unfinished: int, models: tuple[str, ...] | None) -> str:
    """GET /metrics: the scheduler gauges vLLM exports (v1/metrics/loggers.py)."""
    running = min(unfinished, limits.max_num_seqs)
    labels = f'{{engine="0",model_name="{(models or ("fake-model",))[0]}"}}'
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{labels} {float(running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{labels} {float(unfinished - running)}",
    ]
    return "\n".join(lines) + "\n"


async def load_lora(
    limits: VLLMMode, models: tuple[str, ...] | None, adapters: dict[str, str], request: web.Request
) -> web.Response:
    """entrypoints/openai/models/serving.py `load_lora_adapter` and `_check_load_lora_adapter_request`."""
    if not limits.runtime_lora_updating:
        return web.json_response({"detail": "Not Found"}, status=404)
    body = await request.json()
    name, path = body.get("lora_name"), body.get("lora_path")
    if not name or not path:
        message = "Both 'lora_name' and 'lora_path' must be provided."
        return error_response(400, message, "InvalidUserInput")
    if name in (models or ()):
        return error_response(
            400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput"
        )
    if name in adapters and not body.get("load_inplace"):
        return error_response(
            400,
            f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
            "place, set 'load_inplace' to True.",
            "InvalidUserInput",
        )
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        message = f"Loading lora {name} failed: No adapter found for {path}"
        return error_response(404, message, "NotFoundError")
    rank = int(json.loads(config_file.read_text()).get("r", 8))
    if rank > limits.max_lora_rank:
        message = f"LoRA rank {rank} is greater than max_lora_rank {limits.max_lora_rank}."
        return error_response(500, message, "InternalServerError")
    adapters[name] = path
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora(limits: VLLMMode, adapters: dict[str, str], request: web.Request) -> web.Response:
    """POST /v1/unload_lora_adapter."""
    if not limits.runtime_lora_updating:
        return web.json_response({"detail": "Not Found"}, status=404)
    name = (await request.json()).get("lora_name")
    if name not in adapters:
        return error_response(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    del adapters[name]
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def rejection(
    limits: VLLMMode, unfinished: int, body: dict[str, Any], prompts: list[str]
) -> web.Response | None:
    """vLLM's answer to a request it refuses as a whole, or None when it takes the request."""
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > limits.max_stop_strings:
        # FastAPI's RequestValidationError, shaped by
        # entrypoints/serve/exception_handling/handlers/validation.py `validation_exception_handler`.
        detail = {
            "type": "too_long",
            "loc": "body.stop",
            "msg": f"List should have at most {limits.max_stop_strings} items after validation, "
            f"not {len(stop)}",
            "input": f"<list of {len(stop)} items>",
        }
        return error_response(400, f"1 validation error:\n  {detail}", "Bad Request", param="body.stop")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > limits.max_model_len:
        return error_response(
            400,
            f"max_tokens={max_tokens} cannot be greater than max_model_len={limits.max_model_len}. "
            "Please request fewer output tokens.",
            "BadRequestError",
            param="max_tokens",
        )
    for prompt in prompts:
        count = len(words(prompt))
        if count > limits.max_model_len:
            return error_response(
                400,
                f"This model's maximum context length is {limits.max_model_len} tokens. However, your "
                f"prompt contains {count} input tokens, which exceeds this limit even without any output "
                "tokens. Please reduce the length of the input prompt.",
                "BadRequestError",
                param="input_tokens",
            )
        if count == limits.max_model_len:
            return error_response(
                400,
                f"The decoder prompt (length {count}) plus the number of requested output tokens (at "
                f"least 1) is longer than the maximum model length of {limits.max_model_len}. Make sure "
                "that "
                "`max_model_len` is no smaller than the number of text tokens (prompt + requested output "
                "tokens).",
                "BadRequestError",
            )
    n = int(body.get("n") or 1)
    if limits.max_num_queued_reqs is not None and unfinished + n > limits.max_num_queued_reqs:
        return error_response(
            503,
            "The engine is currently busy and cannot accept new requests. Please try again later or on a "
            "different instance.",
            "Service Unavailable",
        )
    return None


def effective_sampling(limits: VLLMMode, body: dict[str, Any]) -> dict[str, Any]:
    """The sampling vLLM would apply: the request's fields, else the model's generation config, else
    vLLM's defaults (completion/protocol.py `to_sampling_params`)."""
    return {
        name: body[name] if body.get(name) is not None else limits.generation_config.get(name, default)
        for name, default in VLLM_SAMPLING_DEFAULTS.items()
    }
