"""The pipeline's dedup: candidates decided slice by slice, in order, exactly as in one call."""

from pathlib import Path

from prefect.cache_policies import NO_CACHE

from schemas import BootstrapConfig, Settings
from tasks.resources.store.rounds import Store
from tasks.round.pipeline import RoundDedup, filter_and_dedup_task
from tasks.round.pool import IndexDelta, load_pool
from tasks.round.records import Candidate, PromptPlan, dedup_candidates
from tasks.round.seeds import load_seeds
from tasks.round.steps import RoundContext
from tests.support import factories

CONFIG = BootstrapConfig(prompts_per_round=3)
TEXTS = [
    "Name three rivers of Africa.",
    "Write a haiku about autumn rain on a tin roof.",
    "Name three rivers in Africa.",  # near-copy of the first: rejected with it as the most similar
    "Explain why the sky looks blue at noon and red at dusk.",
    "Write a haiku about autumn rain on a roof.",  # near-copy of one kept in an earlier slice
    "List five uses of baking soda around the house.",
    "Give an antonym of each word: quick, bright, generous.",
]


def _context(store: Store) -> RoundContext:
    seeds, sha = load_seeds()
    return RoundContext(store.url, 1, "run", None, sha, "m", [], len(seeds))


def test_slices_in_order_decide_as_one_call(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    seeds, _ = load_seeds()
    plan = PromptPlan(0, "prompt", [], 9)
    candidates = [Candidate(t, plan, factories.completion(t)) for t in TEXTS]

    whole = load_pool(store, seeds, "rouge")
    start, vocab_start = len(whole.index), whole.index.vocab_size
    accepted, rejected = dedup_candidates(candidates, whole, CONFIG, 1, "m", None)
    whole_delta = IndexDelta.since(whole.index, start, vocab_start)

    dedup = RoundDedup(
        load_pool(store, seeds, "rouge"), _context(store), CONFIG, Settings(store_url=store.url)
    )
    sliced_accepted, sliced_rejected = [], []
    for piece in (candidates[:1], candidates[1:3], [], candidates[3:6], candidates[6:]):
        kept, dropped = dedup.next_slice(piece)
        sliced_accepted += kept
        sliced_rejected += dropped

    assert len(rejected) == 2 and rejected[1].most_similar_instruction == TEXTS[1]
    assert sliced_accepted == accepted and sliced_rejected == rejected
    assert [r.id for r in accepted] == [
        "r00001-00000",
        "r00001-00001",
        "r00001-00003",
        "r00001-00005",
        "r00001-00006",
    ]
    delta = dedup.delta()
    assert delta.entries.equals(whole_delta.entries) and delta.vocab.equals(whole_delta.vocab)
    assert delta.vocab.schema.metadata == whole_delta.vocab.schema.metadata


def test_the_pipeline_dedup_step_hashes_nothing() -> None:
    """Its input holds the live pool: Prefect must not pickle it to hash it."""
    assert filter_and_dedup_task.cache_policy is NO_CACHE
