"""The steps of a bootstrap round: pure functions joining the stage modules into records, then thin tasks.

Each function takes and returns records; the flow in flows/bootstrap.py calls the tasks in order.
"""

import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas import (
    BootstrapConfig,
    CompletionRecord,
    InstanceRecord,
    InstructionRecord,
    RejectionRecord,
    RoundManifest,
    Settings,
    SimilarInstruction,
)
from schemas.records import Stage
from tasks.resources.llm import REFUSAL_REASONS, CompletionRequest
from tasks.resources.servers.embedded import EmbeddedServer
from tasks.resources.store import Store, records_to_table
from tasks.round.classify import build_classify_prompt, parse_classification
from tasks.round.dedup import deduplicate
from tasks.round.filters import check_instruction, filter_instances
from tasks.round.generate import build_instruction_prompt, parse_instructions, sample_in_context
from tasks.round.instances import build_instance_prompt, parse_instances
from tasks.round.pool import INDEX_FILE, VOCAB_FILE, IndexDelta, Pool, load_pool, pool_size
from tasks.round.seeds import load_seeds
from tasks.round.server_load import generation_load


@dataclass(frozen=True)
class PromptPlan:
    """One instruction-generation prompt and the in-context instructions it shows."""

    prompt_index: int
    prompt: str
    in_context_ids: list[str]
    first_number: int


@dataclass(frozen=True)
class Candidate:
    """A parsed instruction that passed the filters, waiting for dedup."""

    text: str
    plan: PromptPlan
    completion: CompletionRecord


def stage_seed(config: BootstrapConfig, round_number: int, stage: str) -> int:
    """Request seed of one stage of one round, from the base seed, so reruns send identical requests."""
    return random.Random(f"{config.seed}:{round_number}:{stage}").randrange(2**31)


def plan_instruction_prompts(pool: Pool, config: BootstrapConfig, round_number: int) -> list[PromptPlan]:
    """Sample in-context instructions for each prompt, seeded from (base seed, round)."""
    rng = random.Random(f"{config.seed}:{round_number}")
    plans = []
    for prompt_index in range(config.prompts_per_round):
        shown = sample_in_context(
            pool.seed_pairs(), pool.machine, config.num_in_context, config.num_machine_in_context, rng
        )
        prompt = build_instruction_prompt([text for _, text in shown])
        plans.append(PromptPlan(prompt_index, prompt, [i for i, _ in shown], len(shown) + 1))
    return plans


def instruction_requests(
    plans: list[PromptPlan], config: BootstrapConfig, round_number: int
) -> list[CompletionRequest]:
    """Completion requests for the instruction-generation prompts."""
    seed = stage_seed(config, round_number, "instruction")
    return [CompletionRequest(prompt=p.prompt, stage="instruction", seed=seed) for p in plans]


def collect_candidates(
    plans: list[PromptPlan], completions: list[CompletionRecord], config: BootstrapConfig, round_number: int
) -> tuple[list[Candidate], list[RejectionRecord]]:
    """Parse each completion's numbered list and run the instruction filters.

    Returns:
        Candidates in prompt order, and a rejection for every filtered item or unparseable completion.
    """
    candidates: list[Candidate] = []
    rejected: list[RejectionRecord] = []
    for plan, completion in zip(plans, completions, strict=True):
        if completion.rejected is not None:
            rejected.append(_refusal(completion, round_number, "instruction", ""))
            continue
        texts = parse_instructions(completion.text, plan.first_number, completion.finish_reason)
        if not texts:
            rejected.append(
                RejectionRecord(
                    round=round_number,
                    stage="instruction",
                    reason="unparseable",
                    text=completion.text,
                    request_key=completion.key,
                )
            )
        for text in texts:
            keep, reason = check_instruction(
                text, config.min_words, config.max_words, config.blacklist, config.tokenizer
            )
            if keep:
                candidates.append(Candidate(text, plan, completion))
            else:
                rejected.append(
                    RejectionRecord(
                        round=round_number,
                        stage="instruction",
                        reason=reason or "filtered",
                        text=text,
                        request_key=completion.key,
                    )
                )
    return candidates, rejected


def _refusal(completion: CompletionRecord, round_number: int, stage: Stage, text: str) -> RejectionRecord:
    """The rejection of a prompt the server refused alone (its reason, e.g. prompt_too_long)."""
    return RejectionRecord(
        round=round_number,
        stage=stage,
        reason=completion.rejected or "rejected_by_server",
        text=text,
        request_key=completion.key,
    )


def parsed_count(candidates: list[Candidate], filtered: list[RejectionRecord]) -> int:
    """Instructions parsed from the completions: the candidates plus those the filters rejected (not the
    completions that did not parse or whose prompt the server refused)."""
    not_parsed = {"unparseable", *REFUSAL_REASONS}
    return len(candidates) + sum(1 for r in filtered if r.reason not in not_parsed)


def dedup_candidates(
    candidates: list[Candidate],
    pool: Pool,
    config: BootstrapConfig,
    round_number: int,
    model: str,
    dask_address: str | None,
) -> tuple[list[InstructionRecord], list[RejectionRecord]]:
    """ROUGE-L dedup against the whole pool, greedily in order; kept candidates join `pool.index`.

    The pool is the caller's own (the dedup step loads one per call), so growing its index is local.
    """
    ids = [f"r{round_number:05d}-{n:05d}" for n in range(len(candidates))]
    decisions = deduplicate(
        ids,
        [c.text for c in candidates],
        pool.index,
        threshold=config.rouge_threshold,
        top_k=config.dedup_top_k,
        lineage=config.dedup_lineage,
        dask_address=dask_address,
    )
    index = pool.index
    accepted: list[InstructionRecord] = []
    rejected: list[RejectionRecord] = []
    for candidate_id, candidate, decision in zip(ids, candidates, decisions, strict=True):
        closest = None if decision.most_similar is None else index.texts[decision.most_similar]
        if not decision.keep:
            rejected.append(
                RejectionRecord(
                    round=round_number,
                    stage="dedup",
                    reason=f"rouge_l>{config.rouge_threshold}",
                    text=candidate.text,
                    request_key=candidate.completion.key,
                    max_rouge=decision.max_score,
                    most_similar_instruction=closest,
                )
            )
            continue
        accepted.append(
            InstructionRecord(
                id=candidate_id,
                round=round_number,
                instruction=candidate.text,
                request_key=candidate.completion.key,
                prompt_index=candidate.plan.prompt_index,
                in_context_ids=candidate.plan.in_context_ids,
                model=model,
                sampling=config.instruction_sampling,
                max_rouge=decision.max_score,
                most_similar=[
                    SimilarInstruction(id=index.ids[p], instruction=index.texts[p], score=s)
                    for p, s in decision.top_k
                ],
                avg_similarity=decision.mean_score,
            )
        )
    return accepted, rejected


def classify_requests(
    accepted: list[InstructionRecord], config: BootstrapConfig, round_number: int
) -> list[CompletionRequest]:
    """One is-it-classification question per accepted instruction."""
    seed = stage_seed(config, round_number, "classify")
    return [CompletionRequest(build_classify_prompt(r.instruction), "classify", seed) for r in accepted]


def apply_classification(
    accepted: list[InstructionRecord], completions: list[CompletionRecord], round_number: int
) -> tuple[list[InstructionRecord], list[RejectionRecord]]:
    """Copies of the instructions with is_classification and the raw answer set.

    Returns:
        The classified instructions, and a rejection for each whose question the server refused.
    """
    classified: list[InstructionRecord] = []
    rejected: list[RejectionRecord] = []
    for record, c in zip(accepted, completions, strict=True):
        if c.rejected is not None:
            rejected.append(_refusal(c, round_number, "classify", record.instruction))
            continue
        classified.append(
            record.model_copy(
                update={"is_classification": parse_classification(c.text), "classification_raw": c.text}
            )
        )
    return classified, rejected


def instance_requests(
    accepted: list[InstructionRecord], config: BootstrapConfig, round_number: int
) -> list[CompletionRequest]:
    """Instance-generation prompts: output-first for classification tasks, input-first for the rest."""
    seed = stage_seed(config, round_number, "instance")
    return [
        CompletionRequest(
            build_instance_prompt(r.instruction, bool(r.is_classification), config.max_instances),
            "instance",
            seed,
        )
        for r in accepted
    ]


def collect_instances(
    accepted: list[InstructionRecord],
    completions: list[CompletionRecord],
    config: BootstrapConfig,
    round_number: int,
) -> tuple[list[InstructionRecord], list[InstanceRecord], list[RejectionRecord]]:
    """Parse and filter instances; an instruction left with no valid instance is rejected.

    Returns:
        The instructions that keep at least one instance, their instances, and the rejections.
    """
    kept: list[InstructionRecord] = []
    instances: list[InstanceRecord] = []
    rejected: list[RejectionRecord] = []
    for record, completion in zip(accepted, completions, strict=True):
        if completion.rejected is not None:
            rejected.append(_refusal(completion, round_number, "instance", record.instruction))
            continue
        pairs = parse_instances(completion.text, bool(record.is_classification), completion.finish_reason)
        good, bad = filter_instances(pairs, config.max_instances, config.max_field_chars)
        for instance_input, instance_output, reason in bad:
            rejected.append(
                RejectionRecord(
                    round=round_number,
                    stage="instance",
                    reason=reason,
                    text=record.instruction,
                    instance_input=instance_input,
                    instance_output=instance_output,
                    request_key=completion.key,
                )
            )
        if not good:
            rejected.append(
                RejectionRecord(
                    round=round_number,
                    stage="instance",
                    reason="no_valid_instance",
                    text=record.instruction,
                    request_key=completion.key,
                    max_rouge=record.max_rouge,
                )
            )
            continue
        kept.append(record)
        instances.extend(
            InstanceRecord(
                instruction_id=record.id,
                round=round_number,
                index=i,
                input=instance_input,
                output=instance_output,
                request_key=completion.key,
            )
            for i, (instance_input, instance_output) in enumerate(good)
        )
    return kept, instances, rejected


def round_counts(
    prompts: int,
    candidates_parsed: int,
    instructions: list[InstructionRecord],
    instances: list[InstanceRecord],
    rejected: list[RejectionRecord],
) -> dict[str, int]:
    """The counts a round reports everywhere (manifest, artifacts, CLI), derived from its records."""
    counts: dict[str, int] = {
        "prompts": prompts,
        "generated": candidates_parsed,
        "kept": len(instructions),
        "classification": sum(1 for r in instructions if r.is_classification),
        "instances": len(instances),
    }
    by_reason = Counter(f"rejected:{r.stage}:{r.reason}" for r in rejected)
    counts.update(sorted(by_reason.items()))
    return counts


@dataclass(frozen=True)
class RoundResult:
    """Everything a round commits."""

    number: int
    run_id: str
    model: str
    seeds_sha256: str
    pool_size_before: int
    prompts: int
    candidates_parsed: int
    instructions: list[InstructionRecord]
    instances: list[InstanceRecord]
    rejected: list[RejectionRecord]
    completions: list[CompletionRecord]
    concurrency: int | None = None  # HTTP requests kept in flight at most; None records no server load
    per_prompt_tokens: bool = False  # the servers returned token ids: each record's prompt tokens are its own


def write_round(
    store: Store,
    result: RoundResult,
    delta: IndexDelta,
    config: BootstrapConfig,
    opened_at: float | None = None,
) -> RoundManifest:
    """Write the round's files, then its manifest last.

    Args:
        store: The round store; the run holds the claim of `result.number`.
        result: The round's records and counts.
        delta: What dedup added to the pool index; only the finally accepted instructions are written.
        config: The round's config, recorded in the manifest.
        opened_at: When this run opened the round (Unix time): the server load counts only the requests
            sent since, and the round's wall time runs from it.

    Returns:
        The committed manifest.
    """
    number = result.number
    entries, vocab = delta.kept(r.id for r in result.instructions)
    files = {
        f"{name}.parquet": store.write_table(number, name, records_to_table(records, name))
        for name, records in (
            ("instructions", result.instructions),
            ("instances", result.instances),
            ("rejected", result.rejected),
            ("requests", result.completions),
        )
    }
    files.update(
        {
            f"{INDEX_FILE}.parquet": store.write_table(number, INDEX_FILE, entries),
            f"{VOCAB_FILE}.parquet": store.write_table(number, VOCAB_FILE, vocab),
        }
    )
    manifest = RoundManifest(
        round=number,
        run_id=result.run_id,
        created_at=datetime.now(UTC),
        model=result.model,
        seeds_sha256=result.seeds_sha256,
        pool_size_before=result.pool_size_before,
        counts=round_counts(
            result.prompts, result.candidates_parsed, result.instructions, result.instances, result.rejected
        ),
        config=config,
        files=files,
        load=None
        if result.concurrency is None
        else generation_load(
            result.completions,
            result.concurrency,
            result.per_prompt_tokens,
            since=opened_at,
            round_wall_s=None if opened_at is None else max(0.0, time.time() - opened_at),
        ),
    )
    store.commit(manifest)
    return manifest


@contextmanager
def llm_endpoints(urls: list[str], settings: Settings) -> Iterator[list[str]]:
    """Base URLs to generate with: given ones, else Settings', else an embedded server for the duration."""
    configured = [u.rstrip("/") for u in urls] or settings.llm_urls()
    if configured:
        yield configured
        return
    with EmbeddedServer(cache_dir=Path(settings.store_url).expanduser() / "models") as server:
        yield [server.url]


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
    from tasks.training.finetune import latest_finetune  # only rounds that ask for it read the fine-tunes

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


def _load_round_pool(ctx: RoundContext, config: BootstrapConfig, settings: Settings) -> Pool:
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
    return plan_instruction_prompts(_load_round_pool(ctx, config, settings), config, ctx.number)


@task(name="rouge-dedup", cache_policy=NO_CACHE)
def dedup_candidates_task(
    candidates: list[Candidate], ctx: RoundContext, config: BootstrapConfig, settings: Settings
) -> DedupResult:
    """Load the round's pool, deduplicate the candidates against it; return the decisions and the delta."""
    pool = _load_round_pool(ctx, config, settings)
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
