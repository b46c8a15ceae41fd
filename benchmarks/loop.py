"""The whole loop on the embedded CPU model: bootstrap rounds, an audit, and the seeds-only ablation.

One embedded llama.cpp server (SmolLM2-135M-Instruct) generates the rounds and judges; the fine-tunes and the
held-out answers run on the same SmolLM2-135M through transformers. Baseline: the fine-tune on the seeds
only, with the same base model, steps, learning rate, batch size and seed as the fine-tune on seeds + rounds,
both evaluated on the same held-out tasks. Prints one table with 95% intervals.

Usage: python benchmarks/loop.py [--quick] [--rounds N] [--prompts N] [--max-steps N] [--limit N]

Sizes: the default aims at about 30 minutes on 2 idle cores; --quick at about 10.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.prefect_home import use_throwaway_prefect_home  # noqa: E402

use_throwaway_prefect_home("bench-loop-prefect-", startup_timeout_s=300)  # before anything imports Prefect

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(width=200)

SIZES = {
    "full": {"rounds": 3, "prompts": 16, "max_steps": 60, "limit": 64, "audit": 50},
    "quick": {"rounds": 2, "prompts": 8, "max_steps": 20, "limit": 24, "audit": 20},
}


def main() -> None:
    """Run the loop and print the comparison table and where the time went."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="A reduced size (about 10 minutes).")
    parser.add_argument("--rounds", type=int, help="Bootstrap rounds.")
    parser.add_argument("--prompts", type=int, help="Instruction-generation prompts per round.")
    parser.add_argument("--max-steps", type=int, help="Optimizer steps of each fine-tune.")
    parser.add_argument("--limit", type=int, help="Held-out tasks evaluated.")
    parser.add_argument("--audit", type=int, help="Instructions judged by the audit of the last round.")
    parser.add_argument("--store", type=Path, help="Store folder (default: a temporary one, removed).")
    args = parser.parse_args()
    size = dict(SIZES["quick" if args.quick else "full"])
    for key in size:
        if getattr(args, key, None) is not None:
            size[key] = getattr(args, key)

    from flows.audit import audit
    from flows.bootstrap import bootstrap_round
    from flows.compare import compare
    from schemas import BootstrapConfig, RoundParams
    from schemas.audit import AuditParams
    from schemas.training import CompareParams, ComparisonResult, EvaluateParams, FinetuneParams
    from selfinstruct.cli_train import print_comparison
    from tasks.quality.audit import QUESTION_TEXT, format_rate
    from tasks.resources.servers.embedded import EmbeddedServer

    store_dir = args.store or Path(tempfile.mkdtemp(prefix="bench-loop-store-"))
    if args.store is None:
        atexit.register(shutil.rmtree, store_dir, ignore_errors=True)
    store_url = str(store_dir)
    os.environ["SELFINSTRUCT_STORE_URL"] = store_url
    console.print(
        f"size: {size}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    timings: list[tuple[str, float]] = []

    def timed(label: str, start: float) -> None:
        timings.append((label, time.perf_counter() - start))
        console.print(f"{label}: {timings[-1][1]:.0f} s")

    with EmbeddedServer(cache_dir=store_dir / "models") as server:
        os.environ["SELFINSTRUCT_LLM_URL"] = server.url
        config = BootstrapConfig(prompts_per_round=size["prompts"])
        for _ in range(size["rounds"]):
            start = time.perf_counter()
            summary = bootstrap_round(
                RoundParams(store_url=store_url, llm_urls=[server.url], config=config, store_slot=False)
            )
            counts = summary["counts"]
            timed(f"round {summary['round']} (kept {counts['kept']}, instances {counts['instances']})", start)  # type: ignore[index]

        start = time.perf_counter()
        audited = audit(AuditParams(store_url=store_url, sample=size["audit"], judge_urls=[server.url]))
        timed(f"audit of round {audited['round']} ({audited['sampled']} judged)", start)

        start = time.perf_counter()
        params = CompareParams(
            store_url=store_url,
            finetune=FinetuneParams(max_steps=size["max_steps"], batch_size=8, seed=42),
            evaluate=EvaluateParams(limit=size["limit"], judge_urls=[server.url], max_new_tokens=64),
        )
        result = ComparisonResult.model_validate(compare(params)["result"])
        timed("both fine-tunes, both evaluations, comparison", start)

    console.rule("Audit of the last round (judge: the embedded SmolLM2-135M)")
    for raw in audited["rates"]:  # type: ignore[attr-defined]
        from schemas.audit import RateEstimate

        rate = RateEstimate.model_validate(raw)
        console.print(f"  {QUESTION_TEXT[rate.question]}: {rate.yes} / {rate.n} = {format_rate(rate)}")
    console.print(f"  unparseable judge answers: {audited['unparseable']} of {audited['sampled']}")
    console.rule("Seeds only vs seeds + rounds")
    print_comparison(result)
    table = Table(title="Where the time went")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for label, seconds in timings:
        table.add_row(label, f"{seconds:.0f}")
    table.add_row("total", f"{sum(s for _, s in timings):.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
