"""Serving a fine-tune: its adapter loaded into a running vLLM server under the fine-tune's id.

The server must run with --enable-lora and runtime LoRA updating on, as `selfinstruct llm serve --engine vllm
--enable-lora` starts it; requests then name the fine-tune id as their model.
"""

import shutil
import tempfile
from pathlib import Path

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.training import FinetuneParams
from tasks.resources.redact import redact_url
from tasks.resources.secrets import run_settings
from tasks.resources.servers.vllm import RUNTIME_LORA_ENV
from tasks.resources.store.layout import FINETUNES
from tasks.resources.store.rounds import Store, open_store
from tasks.training.models import FinetuneError


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
