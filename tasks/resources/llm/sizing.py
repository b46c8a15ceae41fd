"""Sizing generation to the server: prompts per request and requests in flight that keep vLLM busy.

vLLM schedules every prompt of a /v1/completions request as its own sequence, up to `--max-num-seqs` at once
(vLLM 0.33.0 defaults to 1024 on H100/H200-class GPUs and 256 on smaller ones: engine/arg_utils.py
`get_batch_defaults`); the rest wait in its queue. The client's defaults (8 prompts x 4 requests = 32
sequences) leave such a GPU mostly idle. When the server is vLLM, `size_for_servers` keeps about
`max_num_seqs` sequences running per server plus a quarter more waiting, so that the scheduler never runs dry
between two requests, minus what other clients already keep busy there.

The server does not report `--max-num-seqs` itself; its GET /metrics page reports the
`vllm:num_requests_running` and `vllm:num_requests_waiting` gauges (v1/metrics/loggers.py), which tell that
the server is vLLM and how busy it is. `Settings.llm_server_max_seqs` says the rest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas import Settings
from tasks.resources.redact import redact_url

# Spare sequences queued beyond what runs, as a fraction of max_num_seqs.
_QUEUE_SHARE = 0.25
# Prompts per request at most: big enough that HTTP overhead vanishes, small enough that one slow sequence
# holds few others back (a request returns when its last prompt finishes). vLLM accepts up to 1024
# (VLLM_MAX_COMPLETION_PROMPTS).
_MAX_BATCH = 64
# Requests per server at least, so that one finishing never leaves the server without the next.
_MIN_REQUESTS_PER_SERVER = 4
_GAUGE = re.compile(
    r"^(vllm:num_requests_(?:running|waiting))(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.MULTILINE
)


@dataclass(frozen=True)
class ServerLoad:
    """What a vLLM server reports about its scheduler: sequences running and waiting (summed over engines)."""

    running: int
    waiting: int


def parse_vllm_metrics(text: str) -> ServerLoad | None:
    """Read the scheduler gauges from a Prometheus text page.

    Args:
        text: The body of GET /metrics.

    Returns:
        The load summed over every engine and model label; None when the page has no vLLM gauges.
    """
    totals = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
    found = False
    for name, value in _GAUGE.findall(text):
        try:
            totals[name] += float(value)
        except ValueError:
            continue
        found = True
    if not found:
        return None
    return ServerLoad(int(totals["vllm:num_requests_running"]), int(totals["vllm:num_requests_waiting"]))


def plan_throughput(max_num_seqs: int, servers: int, busy: int = 0) -> tuple[int, int]:
    """Batch size and concurrency that keep `servers` vLLM servers full without piling up their queues.

    Args:
        max_num_seqs: Sequences one server runs at once.
        servers: How many servers share the work.
        busy: Sequences other clients already keep running or waiting on them.

    Returns:
        (prompts per request, requests in flight in total). For one idle server of 1024 sequences: (64, 20),
        i.e. 1280 prompts in flight; of 256: (20, 16).
    """
    target = max(servers, math.ceil(servers * max_num_seqs * (1 + _QUEUE_SHARE)) - busy)
    batch = max(1, min(_MAX_BATCH, target // (_MIN_REQUESTS_PER_SERVER * servers * 4) or 1))
    concurrency = max(servers * _MIN_REQUESTS_PER_SERVER, math.ceil(target / batch))
    return batch, min(concurrency, 1024)


def fetch_server_load(url: str, settings: Settings, timeout_s: float = 5.0) -> ServerLoad | None:
    """GET the server's /metrics page (beside /v1) and read vLLM's gauges; None when it is not vLLM."""
    root = url.rstrip("/").removesuffix("/v1")
    headers = {}
    if settings.api_key is not None and settings.api_key.get_secret_value():
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    try:
        response = httpx.get(f"{root}/metrics", headers=headers, timeout=timeout_s)
    except httpx.HTTPError:
        return None
    return parse_vllm_metrics(response.text) if response.status_code == 200 else None


def size_for_servers(settings: Settings, urls: list[str]) -> Settings:
    """The settings to generate with on these servers.

    When every server is vLLM: token ids are requested (exact per-prompt token counts), and unless the
    batch size or concurrency was set explicitly (environment or constructor) and `llm_autosize` is on, both
    come from `plan_throughput`. Anything else (llama.cpp, a proxy without /metrics) keeps the settings.
    """
    loads = [fetch_server_load(u, settings) for u in urls]
    if not urls or any(load is None for load in loads):
        return settings
    update: dict[str, object] = {"llm_token_ids": True}
    explicit = {"llm_batch_size", "llm_concurrency"} & settings.model_fields_set
    if settings.llm_autosize and not explicit:
        busy = sum(load.running + load.waiting for load in loads if load is not None)
        batch, concurrency = plan_throughput(settings.llm_server_max_seqs, len(urls), busy)
        update |= {"llm_batch_size": batch, "llm_concurrency": concurrency}
    return settings.model_copy(update=update)


@task(name="size-generation", cache_policy=NO_CACHE)  # its input holds the API key: never hash or persist it
def size_for_servers_task(settings: Settings, urls: list[str]) -> Settings:
    """Prefect task: `size_for_servers`, logging what it chose."""
    sized = size_for_servers(settings, urls)
    if sized is not settings:
        get_run_logger().info(
            "vLLM at %s: %d prompts per request, %d requests in flight, token ids %s",
            ", ".join(redact_url(u) for u in urls),
            sized.llm_batch_size,
            sized.llm_concurrency,
            "on" if sized.llm_token_ids else "off",
        )
    return sized
