"""One bootstrap round, staged vs pipelined, against the round's lower bound: how busy it keeps the server.

Baseline (lower bound): the same prompts the round sent, replayed with no dependencies between them (every
stage at once, one client, the same prompts per request and requests in flight) on a fresh server; its
completion tokens/s is the server's measured maximum rate for this load, and the round's completion tokens
at that rate is the least wall time the round could take.

(a) the embedded llama.cpp server (SmolLM2-135M, 4 slots), 64 prompts (--quick: 8, completions of at most
    160 tokens);
(b) the fake OpenAI server in its own process, with the latency of a batching GPU engine (tests/support/
    engine_latency.py) and answers that parse like a good model's (tests/support/model_like.py: most new
    instructions survive dedup, so every stage has work), 2,000 prompts (--quick: 500), 16 prompts a
    request and 16 requests in flight.

Each mode runs the round in a fresh store with the same seed, against a fresh server (so that no prompt
cache carries over). Pipelined mode is `BootstrapConfig.pipelined` when the config has that field; without
it only the staged round runs. Targets (not asserted): busy >= 90% and wall <= 1.15x the lower bound in (b),
<= 1.3x in (a).

Usage: python benchmarks/round.py [--quick] [--only a|b] [--prompts N]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Prefect reads its settings once, at first import: point it at a throwaway home before anything imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="bench-round-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from schemas import BootstrapConfig, CompletionRecord, RoundParams, SamplingParams  # noqa: E402
from schemas.records import StageLoad  # noqa: E402
from tasks.resources.llm.batch import CompletionRequest, generate  # noqa: E402
from tasks.resources.llm.client import OpenAICompletionClient  # noqa: E402
from tasks.resources.servers.embedded import EmbeddedServer  # noqa: E402
from tasks.resources.store.rounds import Store  # noqa: E402
from tests.support.engine_latency import BatchingLatency  # noqa: E402

console = Console(width=200)
PIPELINED = "pipelined" in BootstrapConfig.model_fields
ENGINE = BatchingLatency(base_s=0.05, per_token_s=0.004, saturation=64.0)
SIZES = {"a": {"full": 64, "quick": 8}, "b": {"full": 2000, "quick": 500}}
# --quick on the embedded server also cuts completions to this many tokens (instructions and instances), as
# the end-to-end tests do: a default round of 8 prompts took 400-1000 s on the shared 2-core machine.
QUICK_MAX_TOKENS = 160
CLIENT = {"a": (8, 4), "b": (16, 16)}  # prompts per request, requests in flight


@dataclass
class Row:
    part: str
    mode: str
    round_wall_s: float
    generation_wall_s: float
    busy: float
    completion_tokens: int
    requests: int
    stages: dict[str, StageLoad]

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.round_wall_s if self.round_wall_s else 0.0


@contextlib.contextmanager
def fake_server() -> Iterator[str]:
    """The fake OpenAI server with the batching-engine latency, in its own process."""
    spec = f"{ENGINE.base_s},{ENGINE.per_token_s},{ENGINE.saturation}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_openai", "--batching", spec, "--model-like"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"fake server did not start: {line!r}")
        yield line.removeprefix("READY ")
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def server(part: str, store_dir: Path) -> Iterator[str]:
    if part == "a":
        with EmbeddedServer(cache_dir=ROOT / "data" / "models") as embedded:
            yield embedded.url
    else:
        with fake_server() as url:
            yield url


def round_config(part: str, mode: str, prompts: int, quick: bool) -> BootstrapConfig:
    """The round's config: the defaults, the size, the mode, and shorter completions for a quick (a)."""
    config = BootstrapConfig()
    update: dict[str, object] = {"prompts_per_round": prompts}
    if PIPELINED:
        update["pipelined"] = mode == "pipelined"
    if quick and part == "a":
        for name in ("instruction_sampling", "instance_sampling"):
            sampling: SamplingParams = getattr(config, name)
            update[name] = sampling.model_copy(update={"max_tokens": QUICK_MAX_TOKENS})
    return config.model_copy(update=update)


def run_round(part: str, mode: str, config: BootstrapConfig) -> tuple[Row, list[CompletionRecord]]:
    from flows.bootstrap import bootstrap_round

    store_dir = Path(tempfile.mkdtemp(prefix=f"bench-round-{part}-{mode}-"))
    atexit.register(shutil.rmtree, store_dir, ignore_errors=True)
    batch, concurrency = CLIENT[part]
    os.environ["SELFINSTRUCT_LLM_BATCH_SIZE"] = str(batch)
    os.environ["SELFINSTRUCT_LLM_CONCURRENCY"] = str(concurrency)
    with server(part, store_dir) as url:
        start = time.perf_counter()
        summary = bootstrap_round(
            RoundParams(store_url=str(store_dir), llm_urls=[url], config=config, store_slot=False)
        )
        console.print(f"({part}) {mode}: round took {time.perf_counter() - start:.0f} s: {summary['counts']}")
    store = Store(str(store_dir))
    number = int(summary["round"])  # type: ignore[call-overload]
    manifest = store.read_manifest(number)
    load = manifest.load
    assert load is not None, "the manifest records no server load"
    records = [CompletionRecord.model_validate(r) for r in store.read_table(number, "requests").to_pylist()]
    row = Row(
        part,
        mode,
        load.round_wall_s or load.wall_s,
        load.wall_s,
        load.busy_fraction,
        load.completion_tokens,
        sum(s.requests for s in load.stages.values()),
        load.stages,
    )
    return row, records


async def replay(
    url: str, records: list[CompletionRecord], config: BootstrapConfig, part: str
) -> tuple[float, int]:
    """Send every prompt of the round at once (no stage waits for another); (wall s, completion tokens)."""
    batch, concurrency = CLIENT[part]
    sampling: dict[str, SamplingParams] = {
        "instruction": config.instruction_sampling,
        "classify": config.classify_sampling,
        "instance": config.instance_sampling,
    }
    client = OpenAICompletionClient([url], records[0].model, max_in_flight=concurrency, timeout_s=3600)
    groups = {
        stage: [CompletionRequest(r.prompt, r.stage, r.seed) for r in records if r.stage == stage]
        for stage in sampling
    }
    start = time.perf_counter()
    try:
        results = await asyncio.gather(
            *(
                generate(client, reqs, sampling[s], None, batch, concurrency)
                for s, reqs in groups.items()
                if reqs
            )
        )
    finally:
        await client.aclose()
    wall = time.perf_counter() - start
    return wall, sum(r.completion_tokens for records_ in results for r in records_)


def lower_bound(part: str, records: list[CompletionRecord], config: BootstrapConfig) -> tuple[float, float]:
    """(measured maximum completion tokens/s, seconds for the round's completion tokens at that rate)."""
    answered = [r for r in records if r.rejected is None]
    with server(part, Path(tempfile.gettempdir())) as url:
        wall, tokens = asyncio.run(replay(url, answered, config, part))
    rate = tokens / wall
    round_tokens = sum(r.completion_tokens for r in {r.key: r for r in answered}.values())
    return rate, round_tokens / rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8 short prompts in (a), 500 in (b)")
    parser.add_argument("--only", choices=["a", "b"], help="Run one part only.")
    parser.add_argument("--prompts", type=int, help="Instruction prompts per round instead of the size's.")
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    modes = ["staged", "pipelined"] if PIPELINED else ["staged"]
    if not PIPELINED:
        console.print("[yellow]BootstrapConfig has no `pipelined` field: only the staged round runs[/]")
    table = Table(title=f"One round vs its lower bound ({size} size)")
    for column in (
        "part", "mode", "prompts", "round wall s", "generation wall s", "busy", "requests",
        "completion tokens/s", "max rate tok/s", "lower bound s", "wall / lower bound", "target",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    stage_table = Table(
        title="Stages (wall: a stage's first send to its last receive; pipelined stages overlap)"
    )
    for column in (
        "part",
        "mode",
        "stage",
        "requests",
        "prompts",
        "wall s",
        "prompt tokens",
        "cached",
        "completion tokens",
    ):
        stage_table.add_column(column, justify="right")
    for part in [p for p in ("a", "b") if args.only in (None, p)]:
        prompts = args.prompts or SIZES[part][size]
        configs = [round_config(part, mode, prompts, args.quick) for mode in modes]
        runs = [run_round(part, mode, config) for mode, config in zip(modes, configs, strict=True)]
        rate, bound = lower_bound(part, runs[0][1], configs[0])
        for row, _ in runs:
            table.add_row(
                f"({part}) {'embedded llama.cpp' if part == 'a' else 'fake batching engine'}",
                row.mode,
                str(prompts),
                f"{row.round_wall_s:.1f}",
                f"{row.generation_wall_s:.1f}",
                f"{row.busy:.0%}",
                str(row.requests),
                f"{row.tokens_per_s:.0f}",
                f"{rate:.0f}",
                f"{bound:.1f}",
                f"{row.round_wall_s / bound:.2f}x",
                "busy >= 90%, <= 1.15x" if part == "b" else "<= 1.3x",
            )
            for name, stage in row.stages.items():
                stage_table.add_row(
                    f"({part})",
                    row.mode,
                    name,
                    str(stage.requests),
                    str(stage.prompts),
                    f"{stage.wall_s:.1f}",
                    str(stage.prompt_tokens),
                    "-" if stage.cached_prompt_tokens is None else str(stage.cached_prompt_tokens),
                    str(stage.completion_tokens),
                )
    console.print(table)
    console.print(stage_table)
    console.print(
        f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, "
        f"Python {platform.python_version()}; pipelined mode {'available' if PIPELINED else 'not available'}"
    )


if __name__ == "__main__":
    main()
