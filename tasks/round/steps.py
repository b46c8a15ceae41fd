"""The steps of a bootstrap round as thin Prefect tasks over the pure functions of `tasks.round.records`.

The executions in `tasks.round.stages` (staged) and `tasks.round.pipeline` (pipelined) call them in order.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas import BootstrapConfig, InstructionRecord, RejectionRecord, RoundManifest, Settings
from tasks.resources.store.rounds import Store
from tasks.round.commit import RoundResult, write_round
from tasks.round.pool import IndexDelta, Pool, load_pool, pool_size
from tasks.round.records import (
    Candidate,
    PromptPlan,
    collect_candidates,
    collect_instances,
    dedup_candidates,
    plan_instruction_prompts,
)
from tasks.round.seeds import load_seeds


@dataclass(frozen=True)
class RoundContext:
    """What every step of a round needs to know, as small values: where, which round, from which pool.

    Steps get this, never a live store or pool: each opens the store from `store_url` and loads the pool of
    `seeds_path` and `rounds` itself, so a step could run in another process and no task input is large.
    """

    store_url: str
    number: int
    run_id: str
    seeds_path: str | None
    seeds_sha256: str
    model: str
    rounds: list[int]
    pool_size_before: int
    opened_at: float | None = None


LATEST_ADAPTER = "latest"


def generation_model(config: BootstrapConfig, settings: Settings, store: Store) -> str:
    """The model name a round sends: its adapter (a registered fine-tune id), else its model, else Settings'.

    Raises:
        ValueError: `adapter` is "latest" and the store has no trained fine-tune.
    """
    if config.adapter is None:
        return config.model or settings.model
    if config.adapter != LATEST_ADAPTER:
        return config.adapter
    from tasks.training.registry import latest_finetune  # only rounds that ask for it read the fine-tunes

    finetune_id = latest_finetune(store)
    if finetune_id is None:
        raise ValueError(f"adapter {LATEST_ADAPTER!r}: the store has no trained fine-tune yet")
    return finetune_id


@dataclass(frozen=True)
class DedupResult:
    """What the dedup step decided: accepted instructions, rejections, and the index delta to commit."""

    accepted: list[InstructionRecord]
    rejected: list[RejectionRecord]
    delta: IndexDelta


def load_round_pool(ctx: RoundContext, config: BootstrapConfig, settings: Settings) -> Pool:
    """The pool a round samples from and deduplicates against: its seeds and the rounds before it."""
    seeds, _ = load_seeds(Path(ctx.seeds_path) if ctx.seeds_path else None)
    return load_pool(Store(ctx.store_url, settings), seeds, config.tokenizer, ctx.rounds)


# Cache policies: every step below is NO_CACHE. Their inputs are records and small values, but a round must
# never be answered from a cache keyed on them (a rerun redoes its steps; the completion cache in the store
# is what makes reruns cheap), and no step is handed a pool for Prefect to hash.


@task(name="open-round", cache_policy=NO_CACHE)
def open_round(
    store_url: str, seeds_path: str | None, config: BootstrapConfig, settings: Settings, run_id: str
) -> RoundContext:
    """Validate the seeds and claim the store's next round; the steps that need the pool load it."""
    seeds, seeds_sha = load_seeds(Path(seeds_path) if seeds_path else None)
    store = Store(store_url, settings)
    number = store.claim_next_round(run_id)
    rounds = [n for n in store.committed_rounds() if n < number]
    return RoundContext(
        store_url=store_url,
        number=number,
        run_id=run_id,
        seeds_path=seeds_path,
        seeds_sha256=seeds_sha,
        model=generation_model(config, settings, store),
        rounds=rounds,
        pool_size_before=pool_size(store, len(seeds), rounds),
        opened_at=time.time(),
    )


@task(name="plan-instruction-prompts", cache_policy=NO_CACHE)
def plan_instruction_prompts_task(
    ctx: RoundContext, config: BootstrapConfig, settings: Settings
) -> list[PromptPlan]:
    """Load the round's pool and plan its instruction-generation prompts."""
    return plan_instruction_prompts(load_round_pool(ctx, config, settings), config, ctx.number)


@task(name="rouge-dedup", cache_policy=NO_CACHE)
def dedup_candidates_task(
    candidates: list[Candidate], ctx: RoundContext, config: BootstrapConfig, settings: Settings
) -> DedupResult:
    """Load the round's pool, deduplicate the candidates against it; return the decisions and the delta."""
    pool = load_round_pool(ctx, config, settings)
    start, vocab_start = len(pool.index), pool.index.vocab_size
    accepted, rejected = dedup_candidates(
        candidates, pool, config, ctx.number, ctx.model, settings.dask_address
    )
    return DedupResult(accepted, rejected, IndexDelta.since(pool.index, start, vocab_start))


collect_candidates_task = task(name="parse-and-filter", cache_policy=NO_CACHE)(collect_candidates)
collect_instances_task = task(name="parse-and-filter-instances", cache_policy=NO_CACHE)(collect_instances)


@task(name="commit-round", cache_policy=NO_CACHE)
def write_round_task(
    ctx: RoundContext, result: RoundResult, delta: IndexDelta, config: BootstrapConfig, settings: Settings
) -> RoundManifest:
    """Write the round's files and the dedup step's index delta, then the manifest last."""
    return write_round(Store(ctx.store_url, settings), result, delta, config, ctx.opened_at)
