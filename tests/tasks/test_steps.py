"""Round steps joined with a real store and pool: cross-round dedup, rejections with reasons, counts."""

from pathlib import Path

from schemas import BootstrapConfig, CompletionRecord, InstructionRecord, SamplingParams
from tasks.pool import load_pool
from tasks.seeds import load_seeds
from tasks.steps import (
    Candidate,
    PromptPlan,
    RoundResult,
    collect_candidates,
    collect_instances,
    dedup_candidates,
    plan_instruction_prompts,
    round_counts,
    write_round,
)
from tasks.store import Store

CONFIG = BootstrapConfig(prompts_per_round=3)


def _completion(
    text: str, key: str = "k", finish_reason: str = "stop", stage: str = "instruction"
) -> CompletionRecord:
    return CompletionRecord(
        key=key,
        stage=stage,
        request_id="req",
        prompt="p",
        text=text,
        finish_reason=finish_reason,  # type: ignore[arg-type]
        prompt_tokens=1,
        completion_tokens=1,
        latency_s=0.1,
        model="m",
        base_url="http://127.0.0.1:1/v1",
        seed=1,
    )


def _commit_round(store: Store, texts: list[str]) -> None:
    """Commit a round through the same steps the flow uses."""
    seeds, digest = load_seeds()
    pool = load_pool(store, seeds, "rouge")
    number = store.claim_next_round(f"run-{len(store.committed_rounds()) + 1}")
    plan = PromptPlan(0, "prompt", ["seed_task_0"], 9)
    start, vocab_start = len(pool.index), pool.index.vocab_size
    accepted, rejected = dedup_candidates(
        [Candidate(t, plan, _completion(t)) for t in texts], pool, CONFIG, number, "m", None
    )
    classified = [
        r.model_copy(update={"is_classification": False, "classification_raw": "No"}) for r in accepted
    ]
    outputs = [
        _completion("Example 1\nInput: a\nOutput: b", key=f"i{i}", stage="instance")
        for i in range(len(classified))
    ]
    kept, instances, unusable = collect_instances(classified, outputs, CONFIG, number)
    write_round(
        store,
        pool,
        RoundResult(
            number=number,
            run_id=f"run-{number}",
            model="m",
            seeds_sha256=digest,
            pool_size_before=pool.size,
            index_start=start,
            vocab_start=vocab_start,
            prompts=1,
            candidates_parsed=len(texts),
            instructions=kept,
            instances=instances,
            rejected=rejected + unusable,
            completions=outputs,
        ),
        CONFIG,
    )


def test_second_round_is_deduplicated_against_the_first(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    first = "Summarize the plot of your favourite novel in exactly three sentences."
    _commit_round(store, [first, "Suggest five names for a bakery that sells only sourdough bread."])
    assert store.read_manifest(1).counts["kept"] == 2

    seeds, _ = load_seeds()
    pool = load_pool(store, seeds, "rouge")
    assert pool.size == len(seeds) + 2
    assert [i for i, _ in pool.machine] == ["r00001-00000", "r00001-00001"]
    plan = PromptPlan(0, "prompt", [], 9)
    again = "Summarize the plot of your favourite novel in three sentences."
    accepted, rejected = dedup_candidates(
        [Candidate(again, plan, _completion(again))], pool, CONFIG, 2, "m", None
    )
    assert accepted == []
    assert rejected[0].reason == "rouge_l>0.7"
    assert rejected[0].most_similar_instruction == first
    assert rejected[0].max_rouge is not None and rejected[0].max_rouge > 0.7


def test_loaded_pool_decides_like_a_freshly_tokenized_one(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    _commit_round(
        store, ["Translate the sentence into formal business English.", "Rank these fruits by sweetness."]
    )
    seeds, _ = load_seeds()
    loaded = load_pool(store, seeds, "rouge")
    from tasks.dedup import PoolIndex, deduplicate

    fresh = PoolIndex.empty("rouge")
    fresh.add([t.id for t in seeds], [t.instruction for t in seeds])
    fresh.add([i for i, _ in loaded.machine], [t for _, t in loaded.machine])
    probe = [
        "Rank these vegetables by sweetness.",
        "Translate the sentence into formal English.",
        "Hello there.",
    ]
    ids = ["a", "b", "c"]
    assert deduplicate(ids, probe, loaded.index) == deduplicate(ids, probe, fresh)


def test_filters_and_parsing_record_every_rejection() -> None:
    plans = [PromptPlan(0, "p0", [], 9), PromptPlan(1, "p1", [], 9)]
    completions = [
        _completion(
            " Describe the image below in detail.\n10. Write a program that sorts numbers.\n11. Hi\n"
            "12. Explain how tides are caused by the moon."
        ),
        _completion(""),
    ]
    candidates, rejected = collect_candidates(plans, completions, CONFIG, 1)
    assert [c.text for c in candidates] == ["Explain how tides are caused by the moon."]
    assert sorted(r.reason for r in rejected) == [
        "blacklist:image",
        "too_short",
        "unparseable",
        "write_a_program",
    ]


def test_instruction_without_valid_instances_is_rejected_and_counts_agree() -> None:
    record = InstructionRecord(
        id="r00001-00000",
        round=1,
        instruction="Name a colour.",
        request_key="k",
        prompt_index=0,
        in_context_ids=[],
        model="m",
        sampling=SamplingParams(),
        max_rouge=0.2,
        most_similar=[],
        avg_similarity=0.1,
        is_classification=False,
        classification_raw="No",
    )
    kept, instances, rejected = collect_instances(
        [record], [_completion("Example 1\nInput: x\nOutput:")], CONFIG, 1
    )
    assert kept == [] and instances == []
    assert [r.reason for r in rejected][-1] == "no_valid_instance"
    counts = round_counts(1, 1, kept, instances, rejected)
    assert counts["kept"] == 0
    assert sum(v for k, v in counts.items() if k.startswith("rejected:")) == len(rejected)


def test_prompt_plans_are_reproducible_per_round(tmp_path: Path) -> None:
    seeds, _ = load_seeds()
    pool = load_pool(Store(str(tmp_path)), seeds, "rouge")
    first = plan_instruction_prompts(pool, CONFIG, 3)
    assert first == plan_instruction_prompts(pool, CONFIG, 3)
    assert first != plan_instruction_prompts(pool, CONFIG, 4)
    assert all(len(p.in_context_ids) == 8 and p.first_number == 9 for p in first)
