"""The round's records, joined from the stage modules: pure functions from prompts to accepted instructions.

Plan the instruction prompts, build each stage's requests, and turn each stage's completions into records
and rejections (parse and filter, ROUGE-L dedup, classification, instances). No Prefect, no I/O: the tasks in
`tasks.round.steps` and the executions in `tasks.round.stages` and `tasks.round.pipeline` call these.
"""

import random
from dataclasses import dataclass

from schemas import (
    BootstrapConfig,
    CompletionRecord,
    InstanceRecord,
    InstructionRecord,
    RejectionRecord,
    SimilarInstruction,
)
from schemas.records import Stage
from tasks.resources.llm.batch import CompletionRequest
from tasks.resources.llm.protocol import REFUSAL_REASONS
from tasks.round.classify import build_classify_prompt, parse_classification
from tasks.round.dedup.greedy import deduplicate
from tasks.round.filters import check_instruction, filter_instances
from tasks.round.generate import build_instruction_prompt, parse_instructions, sample_in_context
from tasks.round.instances import build_instance_prompt, parse_instances
from tasks.round.pool import Pool


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
    first_candidate: int = 0,
) -> tuple[list[InstructionRecord], list[RejectionRecord]]:
    """ROUGE-L dedup against the whole pool, greedily in order; kept candidates join `pool.index`.

    The pool is the caller's own (the dedup step loads one per call), so growing its index is local. Deciding
    the candidates of a round in consecutive slices, each call with the pool the previous one grew and
    `first_candidate` counting the candidates before it, decides exactly as one call on all of them.

    Args:
        first_candidate: Number of the first candidate within the round; candidate n gets id `rRRRRR-nnnnn`.
    """
    ids = [f"r{round_number:05d}-{n:05d}" for n in range(first_candidate, first_candidate + len(candidates))]
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
