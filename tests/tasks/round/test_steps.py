"""Round steps joined with a real store and pool: cross-round dedup, rejections with reasons, counts."""

from pathlib import Path

from prefect.cache_policies import NO_CACHE

from schemas import BootstrapConfig, Settings
from tasks.resources.store.rounds import Store
from tasks.round import steps
from tasks.round.commit import RoundResult, round_counts
from tasks.round.pool import load_pool
from tasks.round.records import (
    Candidate,
    PromptPlan,
    collect_candidates,
    collect_instances,
    dedup_candidates,
    plan_instruction_prompts,
)
from tasks.round.seeds import load_seeds
from tasks.round.steps import dedup_candidates_task, open_round, write_round_task
from tests.support import factories

CONFIG = BootstrapConfig(prompts_per_round=3)


def _commit_round(store: Store, texts: list[str]) -> None:
    """Commit a round through the same steps the flow uses, passing only the values the flow passes."""
    settings = Settings(store_url=store.url)
    ctx = open_round.fn(store.url, None, CONFIG, settings, f"run-{len(store.committed_rounds()) + 1}")
    plan = PromptPlan(0, "prompt", ["seed_task_0"], 9)
    candidates = [Candidate(t, plan, factories.completion(t)) for t in texts]
    dedup = dedup_candidates_task.fn(candidates, ctx, CONFIG, settings)
    classified = [
        r.model_copy(update={"is_classification": False, "classification_raw": "No"}) for r in dedup.accepted
    ]
    outputs = [
        factories.completion("Example 1\nInput: a\nOutput: b", key=f"i{i}", stage="instance")
        for i in range(len(classified))
    ]
    kept, instances, unusable = collect_instances(classified, outputs, CONFIG, ctx.number)
    write_round_task.fn(
        ctx,
        RoundResult(
            number=ctx.number,
            run_id=ctx.run_id,
            model="m",
            seeds_sha256=ctx.seeds_sha256,
            pool_size_before=ctx.pool_size_before,
            prompts=1,
            candidates_parsed=len(texts),
            instructions=kept,
            instances=instances,
            rejected=dedup.rejected + unusable,
            completions=outputs,
        ),
        dedup.delta,
        CONFIG,
        settings,
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
        [Candidate(again, plan, factories.completion(again))], pool, CONFIG, 2, "m", None
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
    from tasks.round.dedup.greedy import deduplicate
    from tasks.round.dedup.index import PoolIndex

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
        factories.completion(
            " Describe the image below in detail.\n10. Write a program that sorts numbers.\n11. Hi\n"
            "12. Explain how tides are caused by the moon."
        ),
        factories.completion(""),
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
    record = factories.instruction(1, 0, "Name a colour.", in_context_ids=[], max_rouge=0.2)
    kept, instances, rejected = collect_instances(
        [record], [factories.completion("Example 1\nInput: x\nOutput:")], CONFIG, 1
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


def test_steps_pass_small_values_and_the_commit_writes_the_dedup_delta(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    _commit_round(store, ["Summarize the plot of your favourite novel in exactly three sentences."])
    settings = Settings(store_url=store.url)
    ctx = open_round.fn(store.url, None, CONFIG, settings, "run-2")
    assert (ctx.number, ctx.rounds) == (2, [1])
    assert ctx.pool_size_before == len(load_seeds()[0]) + 1
    plan = PromptPlan(0, "prompt", [], 9)
    texts = ["Name three rivers of Africa.", "Name three rivers in Africa.", "Write a haiku about rain."]
    dedup = dedup_candidates_task.fn(
        [Candidate(t, plan, factories.completion(t)) for t in texts], ctx, CONFIG, settings
    )
    assert [r.instruction for r in dedup.accepted] == [texts[0], texts[2]]
    assert dedup.delta.entries.column("id").to_pylist() == ["r00002-00000", "r00002-00002"]
    # The step loaded its own pool: a second call decides the same, nothing was kept between them.
    again = dedup_candidates_task.fn(
        [Candidate(t, plan, factories.completion(t)) for t in texts], ctx, CONFIG, settings
    )
    assert again.accepted == dedup.accepted
    entries, _ = dedup.delta.kept(["r00002-00002"])
    assert entries.column("text").to_pylist() == [texts[2]]


def test_no_round_step_hashes_its_inputs() -> None:
    """Prefect's default cache policy would pickle every input to hash it; the round's steps opt out."""
    tasks = [
        value for value in vars(steps).values() if hasattr(value, "cache_policy") and hasattr(value, "fn")
    ]
    assert {t.name for t in tasks} >= {
        "open-round",
        "plan-instruction-prompts",
        "parse-and-filter",
        "rouge-dedup",
        "parse-and-filter-instances",
        "commit-round",
    }
    assert all(t.cache_policy is NO_CACHE for t in tasks)
