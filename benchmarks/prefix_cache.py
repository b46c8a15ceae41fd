"""Prefix reuse on the embedded llama.cpp server: prompt tokens it processed, with and without reuse.

A round's classification prompts share a ~750-token 30-shot prefix, and its instance prompts one of two
~250-token templates. llama.cpp skips the part of a prompt that the slot's KV cache already holds. Two rounds'
classification and instance stages (each after an instruction stage whose prompts evict the prefixes from the
slots) are sent as the round sends them (the project's client, 8 prompts a request, 4 in flight) to servers
built by the embedded server's own `server_params`, varying only the reuse settings:

- `none`: no reuse at all (`cache_prompt` off): every prompt is processed whole.
- `lru`: slot_prompt_similarity 0 and no host prompt cache: a prompt lands on the least recently used slot,
  which reuses what it holds of the prompt (within a stage, after the first wave, the same prefix).
- `similarity`: the slot whose cached prompt matches most, no host prompt cache.
- `embedded`: what `_serve` sets (similarity 0.1 and the host-memory prompt cache).
- `unified` (only with --variants): `embedded` with one KV buffer shared by the slots (kv_unified).

Prompt tokens processed come from the server's /metrics counter (every prompt of a list, not only the first
that usage reports), cached tokens from usage.prompt_tokens_details of each request's first prompt.

Usage: python benchmarks/prefix_cache.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from schemas import BootstrapConfig, SamplingParams  # noqa: E402
from schemas.records import Stage  # noqa: E402
from tasks.resources.llm.batch import CompletionRequest, generate  # noqa: E402
from tasks.resources.llm.client import OpenAICompletionClient  # noqa: E402
from tasks.resources.servers.embedded import (  # noqa: E402
    PROMPT_CACHE_RAM_MIB,
    SLOT_PROMPT_SIMILARITY,
    default_threads,
    server_params,
)
from tasks.resources.servers.models import SMOLLM2, resolve_model  # noqa: E402
from tasks.round.classify import build_classify_prompt  # noqa: E402
from tasks.round.instances import build_instance_prompt  # noqa: E402

console = Console(width=160)
# (cache_prompt, slot_prompt_similarity, cache_ram_mib, kv_unified); None keeps what `server_params` sets.
VARIANTS = {
    "none": (False, 0.0, 0, None),
    "lru": (None, 0.0, 0, None),
    "similarity": (None, SLOT_PROMPT_SIMILARITY, 0, None),
    "embedded": (None, None, None, None),
    "unified": (None, None, None, True),
}
_COUNTER = re.compile(r"^llamacpp:prompt_tokens_total\s+([0-9.eE+-]+)", re.MULTILINE)


@dataclass
class StageRun:
    prompts: int = 0
    processed: float = 0.0
    cached_first: int = 0
    wall_s: float = 0.0


@dataclass
class VariantRun:
    stages: dict[str, StageRun] = field(default_factory=dict)


def processed_tokens(url: str) -> float:
    """The server's count of prompt tokens it evaluated (not taken from a cache) since it started."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    match = _COUNTER.search(text)
    return float(match.group(1)) if match else 0.0


def stage_prompts(stage: Stage, round_number: int, n: int) -> list[str]:
    topics = ["a sentence", "a review", "an email", "a poem", "a headline", "a tweet", "a recipe", "a riddle"]
    texts = [f"Task {round_number}.{i}: decide something about {topics[i % len(topics)]}" for i in range(n)]
    if stage == "classify":
        return [build_classify_prompt(t) for t in texts]
    if stage == "instance":
        return [build_instance_prompt(t, i % 3 == 0) for i, t in enumerate(texts)]
    return [f"Come up with a series of tasks about {t}.\n1." for t in texts]


async def run_stage(url: str, stage: Stage, round_number: int, n: int, run: VariantRun) -> None:
    config = BootstrapConfig()
    sampling = {
        "instruction": SamplingParams(temperature=0.0, max_tokens=8),
        "classify": config.classify_sampling,
        # Instance completions are cut short: this measures prompt processing, not decoding.
        "instance": config.instance_sampling.model_copy(update={"max_tokens": 8}),
    }[stage]
    requests = [CompletionRequest(p, stage, 1) for p in stage_prompts(stage, round_number, n)]
    before = processed_tokens(url)
    client = OpenAICompletionClient([url], SMOLLM2)
    start = time.perf_counter()
    try:
        records = await generate(client, requests, sampling, None, 8, 4)
    finally:
        await client.aclose()
    wall = time.perf_counter() - start
    seen: set[str] = set()
    cached = 0
    for r in records:
        if r.request_id not in seen:
            seen.add(r.request_id)
            cached += r.cached_prompt_tokens or 0
    s = run.stages.setdefault(stage, StageRun())
    s.prompts += n
    s.processed += processed_tokens(url) - before
    s.cached_first += cached
    s.wall_s += wall


def run_variant(name: str, gguf: Path, n: int, rounds: int) -> VariantRun:
    import xllamacpp

    cache_prompt, similarity, cache_ram, unified = VARIANTS[name]
    params = server_params(str(gguf), SMOLLM2, "127.0.0.1", 0, 4, 4096, default_threads())
    params.endpoint_metrics = True
    if cache_prompt is not None:
        params.cache_prompt = cache_prompt
    if similarity is not None:
        params.slot_prompt_similarity = similarity
    if cache_ram is not None:
        params.cache_ram_mib = cache_ram
    if unified is not None:
        params.kv_unified = unified
    server = xllamacpp.Server(params)
    url = f"{server.listening_address.rstrip('/')}/v1"
    run = VariantRun()
    try:
        for r in range(1, rounds + 1):
            for stage in ("instruction", "classify", "instance"):
                asyncio.run(run_stage(url, stage, r, n if stage != "instruction" else 8, run))  # type: ignore[arg-type]
    finally:
        del server
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 instead of 24 prompts per stage")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="lru,similarity,embedded")
    args = parser.parse_args()
    n = 8 if args.quick else 24
    gguf = resolve_model(SMOLLM2, ROOT / "data" / "models")
    table = Table(title=f"prefix reuse, {args.rounds} rounds x {n} prompts per stage (SmolLM2-135M, 4 slots)")
    for col in (
        "variant",
        "stage",
        "prompts",
        "prompt tokens processed",
        "per prompt",
        "cached (1st)",
        "wall s",
    ):
        table.add_column(col, justify="right")
    for name in args.variants.split(","):
        run = run_variant(name, gguf, n, args.rounds)
        for stage in ("classify", "instance"):
            s = run.stages[stage]
            table.add_row(
                name,
                stage,
                str(s.prompts),
                f"{s.processed:.0f}",
                f"{s.processed / s.prompts:.0f}",
                str(s.cached_first),
                f"{s.wall_s:.1f}",
            )
    console.print(table)
    load = os.getloadavg()[0]
    console.print(
        f"{platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, Python {platform.python_version()}"
    )
    console.print(
        f"embedded defaults: similarity {SLOT_PROMPT_SIMILARITY}, cache_ram_mib {PROMPT_CACHE_RAM_MIB}"
    )


if __name__ == "__main__":
    main()
