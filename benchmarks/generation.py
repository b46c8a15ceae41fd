"""Generation throughput, each part measured against its own baseline in the same run.

(a) `generate` against the fake OpenAI server (its own process) answering every request after a fixed
    latency: achieved wall time vs the ideal requests x latency / concurrency.
(b) `generate` against the embedded llama.cpp server: completion tokens/s vs the server's own maximum,
    measured by a direct load of `parallel` concurrent single-prompt requests (raw httpx), alternated with it.
(c) `generate_in_tasks` inside a Prefect flow (ephemeral API, temporary PREFECT_HOME): task runs, and wall
    time beyond a plain `generate` of the same requests.

Usage: python benchmarks/generation.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.prefect_home import use_throwaway_prefect_home  # noqa: E402

use_throwaway_prefect_home("bench-prefect-", startup_timeout_s=180)  # before anything imports Prefect

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from schemas import CompletionRecord, SamplingParams, Settings  # noqa: E402
from tasks.resources.llm.batch import CompletionRequest, generate  # noqa: E402
from tasks.resources.llm.cache import MemoryCache  # noqa: E402
from tasks.resources.llm.client import OpenAICompletionClient  # noqa: E402
from tasks.resources.servers.embedded import EmbeddedServer  # noqa: E402

console = Console(width=180)


@dataclass
class Row:
    part: str
    what: str
    measured: str
    baseline: str
    ratio: float | None
    target: str


class FakeProcess:
    """The fake OpenAI server in its own process, so it does not compete with the client for the GIL."""

    def __init__(self, latency_s: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_openai", "--latency", str(latency_s)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().split()
        self.url = line[1]

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(self.url.removesuffix("/v1") + "/_fake/stats").json())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def requests_for(n: int, tag: str, seed: int = 1) -> list[CompletionRequest]:
    return [
        CompletionRequest(f"Write task number {i} of batch {tag}:", "instruction", seed) for i in range(n)
    ]


async def timed_generate(client: OpenAICompletionClient, *args: Any) -> tuple[float, list[CompletionRecord]]:
    start = time.perf_counter()
    try:
        records = await generate(client, *args)
    finally:
        await client.aclose()
    return time.perf_counter() - start, records


# -- (a) ------------------------------------------------------------------------------------------------


def part_a(latency_s: float, waves: int) -> list[Row]:
    concurrency, batch_size = 64, 8
    n_requests = concurrency * waves
    params = SamplingParams(max_tokens=64)
    fake = FakeProcess(latency_s)

    async def measure() -> tuple[float, int]:
        client = OpenAICompletionClient([fake.url], "fake-model")
        # One untimed wave first: opening 64 connections is a once-per-round cost, not throughput.
        warm = requests_for(concurrency * batch_size, "warm")
        await generate(client, warm, params, None, batch_size, concurrency)
        before = fake.stats()["requests"]
        cpu = time.process_time()
        wall, _ = await timed_generate(
            client, requests_for(n_requests * batch_size, "a"), params, MemoryCache(), batch_size, concurrency
        )
        cpu = time.process_time() - cpu
        return wall, cpu, fake.stats()["requests"] - before

    try:
        wall, cpu, sent = asyncio.run(measure())
    finally:
        fake.stop()
    ideal = sent * latency_s / concurrency
    return [
        Row(
            "a",
            f"{sent} requests x {batch_size} prompts, {latency_s:g}s latency, concurrency {concurrency}",
            # CPU time of this process (the client; the fake server runs in its own): load stretches wall
            # time, not the CPU a request costs.
            f"{wall:.2f} s ({sent / wall:.0f} req/s); client CPU {cpu / sent * 1000:.2f} ms/request",
            f"ideal {ideal:.2f} s ({concurrency / latency_s:.0f} req/s)",
            ideal / wall,
            ">= 95%",
        )
    ]


# -- (b) ------------------------------------------------------------------------------------------------


async def direct_load(
    url: str, prompts: list[str], params: SamplingParams, parallel: int
) -> tuple[float, list[str]]:
    """The server's own maximum: `parallel` workers each sending one prompt at a time."""
    texts: dict[int, str] = {}
    queue = list(enumerate(prompts))
    async with httpx.AsyncClient(timeout=600) as http:

        async def worker() -> None:
            while queue:
                i, prompt = queue.pop(0)
                body = {
                    "model": "smollm2-135m-instruct",
                    "prompt": prompt,
                    "temperature": params.temperature,
                    "top_p": params.top_p,
                    "max_tokens": params.max_tokens,
                    "presence_penalty": params.presence_penalty,
                    "seed": 1,
                }
                response = await http.post(f"{url}/completions", json=body)
                response.raise_for_status()
                texts[i] = response.json()["choices"][0]["text"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(parallel)))
        wall = time.perf_counter() - start
    return wall, [texts[i] for i in range(len(prompts))]


def count_tokens(url: str, texts: list[str]) -> int:
    """Completion tokens by the server's tokenizer (llama.cpp's usage covers only a list's first prompt)."""
    base = url.removesuffix("/v1")
    with httpx.Client(timeout=60) as http:
        return sum(len(http.post(f"{base}/tokenize", json={"content": t}).json()["tokens"]) for t in texts)


def part_b(n_prompts: int = 32, max_tokens: int = 32, pairs: int = 2) -> list[Row]:
    parallel = 4
    settings = Settings()
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_tokens, presence_penalty=0.0)
    runs: dict[str, list[tuple[int, float]]] = {"direct": [], "generate": []}

    def prompts(kind: str, run: int) -> list[str]:
        # Fresh prompts for every run, so that no run profits from another's prompt cache.
        return [
            f"List {3 + i % 5} ideas for a lesson about {kind} topic {run}-{i}:\n1." for i in range(n_prompts)
        ]

    def run_direct(url: str, run: int) -> None:
        wall, texts = asyncio.run(direct_load(url, prompts("direct", run), params, parallel))
        runs["direct"].append((count_tokens(url, texts), wall))

    def run_generate(url: str, run: int) -> None:
        requests = [CompletionRequest(p, "instruction", 1) for p in prompts("generate", run)]
        client = OpenAICompletionClient([url], "smollm2-135m-instruct")
        batch, concurrency = settings.llm_batch_size, settings.llm_concurrency
        wall, records = asyncio.run(
            timed_generate(client, requests, params, MemoryCache(), batch, concurrency)
        )
        runs["generate"].append((count_tokens(url, [r.text for r in records]), wall))

    with EmbeddedServer(parallel=parallel, ctx_per_slot=1024) as server:
        # Warm up: the first requests of a fresh server pay for page faults and graph building.
        asyncio.run(direct_load(server.url, ["Hello"] * parallel, params, parallel))
        # ABBA order: the machine is shared, and a drifting background load must not favour either side.
        for pair in range(pairs):
            order = (run_direct, run_generate) if pair % 2 == 0 else (run_generate, run_direct)
            for run in order:
                run(server.url, pair)

    def rate(kind: str) -> float:
        return sum(t for t, _ in runs[kind]) / sum(w for _, w in runs[kind])

    def each(kind: str) -> str:
        return ", ".join(f"{t / w:.1f}" for t, w in runs[kind])

    return [
        Row(
            "b",
            f"{n_prompts} prompts x {max_tokens} tokens, {pairs} ABBA pairs, {parallel} slots; "
            f"generate batch {settings.llm_batch_size} x concurrency {settings.llm_concurrency}",
            f"{rate('generate'):.1f} tok/s ({each('generate')})",
            f"{rate('direct'):.1f} tok/s direct ({each('direct')})",
            rate("generate") / rate("direct"),
            ">= 90%",
        )
    ]


# -- (c) ------------------------------------------------------------------------------------------------


def part_c(fake: FakeProcess, latency_s: float, n_prompts: int) -> list[Row]:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.runtime import flow_run

    from tasks.resources.llm.chunks import generate_in_tasks

    settings = Settings(model="fake-model", llm_batch_size=8, llm_concurrency=8)
    params = SamplingParams(max_tokens=64)

    @flow(name="bench-warmup")
    def warmup() -> None:
        return None

    @flow(name="bench-generation")
    def bench(requests: list[CompletionRequest]) -> tuple[str, float]:
        start = time.perf_counter()
        generate_in_tasks(requests, params, settings, [fake.url], MemoryCache())
        return str(flow_run.id), time.perf_counter() - start

    start = time.perf_counter()
    warmup()  # starts the ephemeral API server
    startup = time.perf_counter() - start

    requests = requests_for(n_prompts, "c")
    client = OpenAICompletionClient([fake.url], settings.model)
    direct, _ = asyncio.run(
        timed_generate(
            client, requests, params, MemoryCache(), settings.llm_batch_size, settings.llm_concurrency
        )
    )
    requests = requests_for(n_prompts, "c2")
    start = time.perf_counter()
    run_id, in_tasks = bench(requests)
    whole_flow = time.perf_counter() - start

    async def count_task_runs() -> int:
        import uuid

        async with get_client() as client:
            total, page = 0, 200  # the API's largest page
            while True:
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(run_id)])),
                    sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                    limit=page,
                    offset=total,
                )
                total += len(runs)
                if len(runs) < page:
                    return total

    task_runs = asyncio.run(count_task_runs())
    n_batches = -(-n_prompts // settings.llm_batch_size)
    ideal = n_batches * latency_s / settings.llm_concurrency
    chunk = settings.llm_batch_size * settings.llm_concurrency
    return [
        Row(
            "c",
            f"{n_prompts} prompts, batch {settings.llm_batch_size} x concurrency {settings.llm_concurrency} "
            f"(chunks of {chunk}) -> {task_runs} task runs",
            f"generate_in_tasks {in_tasks:.2f} s; whole flow call {whole_flow:.2f} s",
            f"plain generate {direct:.2f} s; ideal {ideal:.2f} s",
            direct / in_tasks,
            "report",
        ),
        Row(
            "c",
            "time outside generation",
            f"tasks: {in_tasks - direct:+.2f} s ({(in_tasks - direct) / task_runs * 1000:+.0f} ms/task run); "
            f"flow: {whole_flow - in_tasks:.2f} s",
            f"ephemeral API start {startup:.1f} s (once)",
            None,
            "report",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Smaller sizes (about a minute).")
    parser.add_argument("--parts", default="abc", help="Which parts to run, e.g. 'ab'.")
    args = parser.parse_args()
    rows: list[Row] = []
    load_before = os.getloadavg()
    if "a" in args.parts:
        for latency in (1.0, 0.5):
            rows += part_a(latency, waves=8 if args.quick else 32)
    latency = 0.5
    fake = FakeProcess(latency)
    try:
        if "b" in args.parts:
            sizes = {"n_prompts": 16, "pairs": 2} if args.quick else {"pairs": 4}
            rows += part_b(**sizes)
        if "c" in args.parts:
            rows += part_c(fake, latency, n_prompts=512 if args.quick else 2048)
    finally:
        fake.stop()

    table = Table(title="Generation benchmark")
    for column in ("part", "what", "measured", "baseline", "ratio", "target"):
        table.add_column(column)
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.1%}"
        table.add_row(row.part, row.what, row.measured, row.baseline, ratio, row.target)
    console.print(table)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    console.print(
        f"machine: {cpu}, {os.cpu_count()} cores; load average before {load_before[0]:.1f}, "
        f"after {os.getloadavg()[0]:.1f}; python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
