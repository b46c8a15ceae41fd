"""The dedup package against rouge_score: tokens, F bit for bit, greedy decisions, stored index, Dask."""

import random
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, scoring

import tasks.round.dedup.greedy as greedy_module
import tasks.round.dedup.index as index_module
import tasks.round.dedup.score as score_module
from tasks.round.dedup.greedy import Decision, deduplicate
from tasks.round.dedup.index import PoolIndex
from tasks.round.dedup.score import rouge_l_fmeasure, rouge_l_scores
from tasks.round.dedup.tokens import Tokenizer, multilingual_tokenize, rouge_tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_f(candidate: str, pool_instruction: str) -> float:
    """rouge_score's F with the argument order the dedup uses: candidate as target, pool as prediction."""
    return float(SCORER.score(candidate, pool_instruction)["rougeL"].fmeasure)


def reference_dedup(
    candidates: list[str], pool: list[str], threshold: float = 0.7, k: int = 10
) -> list[tuple[bool, float, int | None, list[tuple[int, float]], float]]:
    """Self-Instruct's loop, in process: `_score_lcs(new_tokens, pool_tokens)` over the growing pool."""
    tokens = [SCORER._tokenizer.tokenize(text) for text in pool]
    out = []
    for candidate in candidates:
        new = SCORER._tokenizer.tokenize(candidate)
        scores = [float(rouge_scorer._score_lcs(new, t).fmeasure) for t in tokens]
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        best = scores[order[0]] if scores else 0.0
        keep = not best > threshold
        top = [(j, scores[j]) for j in order[:k]]
        out.append((keep, best, order[0] if scores else None, top, float(np.mean(scores)) if scores else 0.0))
        if keep:
            tokens.append(new)
    return out


# -- instruction-like text -----------------------------------------------------------------------------------

_VERBS = "write describe explain summarize classify translate list generate create identify compare rewrite"
_NOUNS = "poem story essay email letter tweet recipe plan summary review headline slogan joke riddle"
_ADJECTIVES = "short long funny formal persuasive detailed brief creative simple technical friendly"
VERBS, NOUNS, ADJS = _VERBS.split(), _NOUNS.split(), _ADJECTIVES.split()
TOPICS = ["climate change", "the ocean", "a cat", "Paris", "ancient Rome", "healthy eating", "remote work"]
TOPICS += ["the solar system", "friendship", "electric cars", "coffee", "space travel", "volcanoes", "music"]
FORMS = [
    "{V} a {A} {N} about {T}.",
    "Can you {v} a {N} on {T} for a {A} audience?",
    "Given a {N} about {T}, {v} it in {X} sentences.",
    "{V} {X} ideas for a {A} {N}. Then {v2} the best one about {T}!",
    "You are given a {N}: {v} whether it's {A} or {A2} (answer yes/no).",
    "In {X} words or fewer, {v} {T}; keep it {A}.",
]


def instruction(rng: random.Random) -> str:
    """One instruction-like text from templates and word lists."""
    verb = rng.choice(VERBS)
    text = rng.choice(FORMS).format(
        V=verb.capitalize(),
        v=verb,
        v2=rng.choice(VERBS),
        A=rng.choice(ADJS),
        A2=rng.choice(ADJS),
        N=rng.choice(NOUNS),
        T=rng.choice(TOPICS),
        X=rng.randint(2, 12),
    )
    return text + " " + instruction(rng) if rng.random() < 0.25 else text


def near_duplicate(rng: random.Random, text: str) -> str:
    """A light rewrite: a word swapped, dropped or shouted, punctuation changed."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words))
        words[i] = rng.choice([rng.choice(NOUNS), words[i].upper() + "!", "", rng.choice(ADJS)])
    return " ".join(w for w in words if w)


def instructions(seed: int, count: int, duplicate_share: float = 0.3) -> list[str]:
    """Instruction-like texts, a share of them near-duplicates of earlier ones."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        out.append(
            near_duplicate(rng, rng.choice(out))
            if out and rng.random() < duplicate_share
            else instruction(rng)
        )
    return out


def new_index(texts: list[str], tokenizer: Tokenizer = "rouge") -> PoolIndex:
    index = PoolIndex.empty(tokenizer)
    index.add([f"p{i}" for i in range(len(texts))], texts)
    return index


def as_tuple(d: Decision) -> tuple[bool, float, int | None, list[tuple[int, float]], float | None]:
    return (d.keep, d.max_score, d.most_similar, d.top_k, d.mean_score)


def assert_same_as_reference(decisions: list[Decision], reference: list, k: int = 10) -> None:
    for got, want in zip(decisions, reference, strict=True):
        assert (got.keep, got.max_score, got.most_similar, got.top_k) == (*want[:3], want[3][:k])
        assert got.mean_score == pytest.approx(want[4], rel=1e-12, abs=1e-15)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str], list]:
    """Pool, candidates and the Self-Instruct loop's verdicts on them (computed once: rouge_score is slow)."""
    texts = instructions(seed=5, count=400)
    pool, candidates = texts[:160], texts[160:]
    return pool, candidates, reference_dedup(candidates, pool)


# -- tokens --------------------------------------------------------------------------------------------------

TRICKY = [
    "",
    "   \t\n",
    "Write a poem; don't rhyme!",
    "snake_case and kebab-case, CamelCase 42x 3.14",
    "\u212a is the Kelvin sign, \u0130stanbul has a dotted I",  # lower() turns both into ASCII letters
    "café naïve Ünïcödé ß",
    "请写一首关于秋天的诗。",
    "emoji 🙂 between words🙂ok",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp",
    "１２３ full-width digits",
]


@pytest.mark.parametrize("text", TRICKY)
def test_rouge_tokenize_is_rouge_scores_tokenizer(text: str) -> None:
    assert rouge_tokenize(text) == SCORER._tokenizer.tokenize(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_rouge_tokenize_property(text: str) -> None:
    assert rouge_tokenize(text) == SCORER._tokenizer.tokenize(text)


def test_multilingual_tokens() -> None:
    assert multilingual_tokenize("Schreiben Sie über Äpfel, s'il vous plaît: café crème!") == [
        "schreiben",
        "sie",
        "über",
        "äpfel",
        "s",
        "il",
        "vous",
        "plaît",
        "café",
        "crème",
    ]
    assert multilingual_tokenize("请写诗，关于秋天。") == ["请", "写", "诗", "关", "于", "秋", "天"]
    assert multilingual_tokenize("ひらがなカタカナ한국어") == list("ひらがなカタカナ한국어")
    assert multilingual_tokenize("Straße_mit हिन्दी") == ["strasse", "mit", "हिन्दी"]  # marks stay in words
    # NFKC: decomposed accents and full-width letters give the same tokens as their composed forms.
    assert multilingual_tokenize("cafe\u0301 ＡＢＣ") == ["café", "abc"]


def test_chinese_duplicates_need_the_multilingual_tokenizer() -> None:
    first, second = "请写一首关于秋天的诗。", "请写一首关于秋天的诗！"
    multilingual = deduplicate(["a", "b"], [first, second], PoolIndex.empty("multilingual"))
    assert [d.keep for d in multilingual] == [True, False]
    assert multilingual[1].max_score == 1.0 and multilingual[1].most_similar == 0
    plain = deduplicate(["a", "b"], [first, second], PoolIndex.empty("rouge"))
    assert [d.keep for d in plain] == [True, True]
    assert plain[1].max_score == 0.0 == rouge_f(second, first)


# -- F bit for bit -------------------------------------------------------------------------------------------


def test_fmeasure_every_length_up_to_150_is_rouge_scores() -> None:
    grid_m, grid_n, grid_lcs = np.meshgrid(np.arange(151), np.arange(151), np.arange(151), indexing="ij")
    valid = grid_lcs <= np.minimum(grid_m, grid_n)
    m, n, lcs = grid_m[valid], grid_n[valid], grid_lcs[valid]
    ours = rouge_l_fmeasure(lcs, m, n)
    triples: list[tuple[int, int, int]] = list(zip(lcs.tolist(), m.tolist(), n.tolist(), strict=True))
    theirs = [0.0 if not (a and b) else scoring.fmeasure(c / b, c / a) for c, a, b in triples]
    assert np.array_equal(ours, np.array(theirs, dtype=np.float64))
    # The argument order never matters: 2*P is exact and * and + commute, in floating point too.
    assert np.array_equal(ours, rouge_l_fmeasure(lcs, n, m))
    # F rises with the LCS at fixed lengths, which the per-length maxima in tasks.round.dedup.score rely on.
    step = (m > 0) & (n > 0) & (lcs < np.minimum(m, n))
    assert (rouge_l_fmeasure(lcs[step] + 1, m[step], n[step]) > ours[step]).all()


def _texts_with_lcs(tag: int, lcs: int, m: int, n: int, rng: random.Random) -> tuple[str, str]:
    """A candidate of m distinct tokens and a pool text of n tokens whose LCS with it is exactly `lcs`."""
    shared = [f"w{tag}x{i}" for i in range(m)]
    extra = iter(f"w{tag}y{i}" for i in range(n - lcs))  # never in the candidate
    in_order = iter(shared[:lcs])
    extra_slots = set(rng.sample(range(n), n - lcs))
    pool = [next(extra) if i in extra_slots else next(in_order) for i in range(n)]
    return " ".join(shared).upper(), ", ".join(pool) + "."


def test_every_triple_at_exactly_seven_tenths() -> None:
    """All (L, m, n), m, n <= 150, with 2L/(m+n) = 7/10: the float F decides, exactly as in rouge_score."""
    rng = random.Random(0)
    lengths = range(1, 151)
    triples = [(7 * (m + n) // 20, m, n) for m in lengths for n in lengths if 7 * (m + n) % 20 == 0]
    triples = [(c, a, b) for c, a, b in triples if c <= min(a, b)]
    # Other ratios lie at least 1/3000 away from 7/10, so no other triple can round to 0.7.
    grid_m, grid_n, grid_lcs = np.meshgrid(lengths, lengths, np.arange(151), indexing="ij")
    at_threshold = (rouge_l_fmeasure(grid_lcs, grid_m, grid_n) == 0.7) & (
        grid_lcs <= np.minimum(grid_m, grid_n)
    )
    found = zip(
        grid_lcs[at_threshold].tolist(),
        grid_m[at_threshold].tolist(),
        grid_n[at_threshold].tolist(),
        strict=True,
    )
    assert set(found) <= set(triples)
    texts = [_texts_with_lcs(i, *triple, rng) for i, triple in enumerate(triples)]
    index = new_index([pool for _, pool in texts])
    decisions = deduplicate([f"c{i}" for i in range(len(texts))], [c for c, _ in texts], index)
    exact = 0
    for (candidate, pool), (lcs, m, n), decision in zip(texts, triples, decisions, strict=True):
        want = rouge_f(candidate, pool)
        assert want == float(rouge_l_fmeasure(lcs, m, n))
        assert decision.max_score == want
        assert decision.keep == (not want > 0.7)
        exact += want == 0.7
    assert exact == at_threshold.sum() and 0 < exact < len(triples)  # both sides of the rounding occur


def test_long_instructions_beyond_uint8() -> None:
    rng = random.Random(1)
    candidate, pool = _texts_with_lcs(0, 280, 300, 320, rng)
    shorter, _ = _texts_with_lcs(0, 0, 260, 1, rng)
    decisions = deduplicate(["a", "b"], [candidate, shorter], new_index([pool]))
    assert decisions[0].max_score == rouge_f(candidate, pool) and not decisions[0].keep
    assert decisions[1].max_score == max(rouge_f(shorter, pool), 0.0)


def test_thousands_of_instruction_pairs_bit_for_bit() -> None:
    texts = instructions(seed=3, count=180, duplicate_share=0.4)
    rows, cols = texts[:90], texts[90:]
    ours = rouge_l_scores(rows, cols)
    theirs = np.array([[rouge_f(r, c) for c in cols] for r in rows])
    assert ours.shape == (90, 90) and np.array_equal(ours, theirs)
    assert (theirs > 0.7).any() and (theirs == 0).any()


def test_empty_token_lists() -> None:
    index = new_index(["!!!", "Write a poem.", ""])
    decisions = deduplicate(["a", "b", "c"], ["???", "write a poem", "..."], index)
    assert [as_tuple(d)[:3] for d in decisions] == [(True, 0.0, 0), (False, 1.0, 1), (True, 0.0, 0)]
    assert decisions[0].top_k[:3] == [(0, 0.0), (1, 0.0), (2, 0.0)]  # all zero: lowest positions first
    assert rouge_f("???", "!!!") == 0.0 == rouge_f("write a poem", "")
    assert_same_as_reference(
        decisions, reference_dedup(["???", "write a poem", "..."], ["!!!", "Write a poem.", ""])
    )


def test_empty_pool_and_empty_call() -> None:
    index = PoolIndex.empty()
    assert deduplicate([], [], index) == []
    (decision,) = deduplicate(["a"], ["Write a poem."], index)
    assert decision == Decision(keep=True, max_score=0.0, most_similar=None, top_k=[], mean_score=0.0)
    assert index.ids == ["a"] and len(index) == 1


# -- greedy decisions ----------------------------------------------------------------------------------------


def test_decisions_match_self_instruct_loop(corpus: tuple[list[str], list[str], list]) -> None:
    pool, candidates, reference = corpus
    decisions = deduplicate([f"c{i}" for i in range(len(candidates))], candidates, new_index(pool), top_k=7)
    assert_same_as_reference(decisions, reference, k=7)
    assert 0.2 < sum(not d.keep for d in decisions) / len(decisions) < 0.8


def test_lineage_off_keeps_the_decisions(corpus: tuple[list[str], list[str], list]) -> None:
    pool, candidates, reference = corpus
    decisions = deduplicate(
        [f"c{i}" for i in range(len(candidates))], candidates, new_index(pool), lineage=False
    )
    assert [(d.keep, d.max_score, d.most_similar) for d in decisions] == [tuple(r[:3]) for r in reference]
    assert all(d.top_k == [] and d.mean_score is None for d in decisions)


def test_greedy_compares_with_kept_candidates_only() -> None:
    first = "a b c d e f g h i j"
    second = "a b c d e f g h x y"  # F 0.8 with first: rejected
    third = "k l c d e f g h x y"  # F 0.8 with second only (0.6 with first): kept, second was not
    fourth = "k l c d e f g h x z"  # F 0.9 with third, kept earlier in the same call
    index = new_index(["the pool has one instruction"])
    decisions = deduplicate(["1", "2", "3", "4"], [first, second, third, fourth], index, top_k=3)
    assert [d.keep for d in decisions] == [True, False, True, False]
    assert decisions[1].most_similar == 1 and decisions[1].max_score == rouge_f(second, first)
    assert decisions[3].most_similar == 2 and decisions[3].max_score == rouge_f(fourth, third)
    assert decisions[3].top_k == [(2, rouge_f(fourth, third)), (1, rouge_f(fourth, first)), (0, 0.0)]
    assert index.ids == ["p0", "1", "3"] and index.texts[2] == third
    assert_same_as_reference(
        decisions, reference_dedup([first, second, third, fourth], ["the pool has one instruction"], k=3)
    )


def test_threshold_is_strictly_greater() -> None:
    candidate, pool = "a b c d e f g", "a b c d e f g h i j k l m n o p q r s t"  # F = 2*7/27
    score = rouge_f(candidate, pool)
    assert deduplicate(["x"], [candidate], new_index([pool]), threshold=score)[0].keep
    assert not deduplicate(["x"], [candidate], new_index([pool]), threshold=np.nextafter(score, 0))[0].keep


def test_blocks_tiles_and_threads_do_not_change_a_bit(
    corpus: tuple[list[str], list[str], list], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, candidates, reference = corpus
    ids = [f"c{i}" for i in range(len(candidates))]
    baseline = deduplicate(ids, candidates, new_index(pool), top_k=5, workers=1)
    monkeypatch.setattr(index_module, "BLOCK_SIZE", 16)
    monkeypatch.setattr(score_module, "_ROW_CHUNK", 7)
    monkeypatch.setattr(greedy_module, "_INTRA_CHUNK", 33)
    sharded = deduplicate(ids, candidates, new_index(pool), top_k=5, workers=2)
    assert [as_tuple(d) for d in sharded] == [as_tuple(d) for d in baseline]  # the mean too, bit for bit
    assert_same_as_reference(sharded, reference, k=5)


WORDS = st.sampled_from(
    ["write", "a", "poem", "story", "about", "cats", "the", "sea", "x", "42", "émigré", "猫"]
)
SEPARATORS = st.sampled_from([" ", ", ", "! ", "?", " - ", "_", "\n", "…", "'"])


@st.composite
def instruction_text(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.tuples(WORDS, SEPARATORS), max_size=12))
    return "".join(w + s for w, s in parts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(instruction_text(), max_size=8), st.lists(instruction_text(), max_size=12))
def test_random_text_property(pool: list[str], candidates: list[str]) -> None:
    decisions = deduplicate([str(i) for i in range(len(candidates))], candidates, new_index(pool), top_k=4)
    assert_same_as_reference(decisions, reference_dedup(candidates, pool, k=4))


# -- the stored index ----------------------------------------------------------------------------------------


def _round_trip(table: pa.Table, path: Path) -> pa.Table:
    pq.write_table(table, path)
    return pq.read_table(path)


def _tokens_of(index: PoolIndex, position: int) -> list[str]:
    return [index._tokens[i] for i in index.token_ids(position)]


def test_loaded_index_decides_like_one_built_from_texts(tmp_path: Path) -> None:
    texts = instructions(seed=9, count=900)
    seeds, rounds, candidates = texts[:100], [texts[100:400], texts[400:700]], texts[700:]
    seed_ids = [f"s{i}" for i in range(len(seeds))]

    built = PoolIndex.empty()
    built.add(seed_ids, seeds)
    stored = []
    for number, texts_of_round in enumerate(rounds):
        start, vocab_start = len(built), built.vocab_size
        deduplicate([f"r{number}-{i}" for i in range(len(texts_of_round))], texts_of_round, built)
        entries, vocab = built.export(start, vocab_start)
        stored.append(
            (
                _round_trip(entries, tmp_path / f"e{number}.parquet"),
                _round_trip(vocab, tmp_path / f"v{number}.parquet"),
            )
        )

    loaded = PoolIndex.empty()
    loaded.add(seed_ids, seeds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path: no re-tokenizing
        for entries, vocab in stored:
            loaded.load(entries, vocab)
    assert loaded.ids == built.ids and loaded.texts == built.texts
    assert loaded._seqs == built._seqs and loaded._tokens == built._tokens
    ids = [f"c{i}" for i in range(len(candidates))]
    assert [as_tuple(d) for d in deduplicate(ids, candidates, loaded)] == [
        as_tuple(d) for d in deduplicate(ids, candidates, built)
    ]


def test_load_remaps_or_retokenizes_when_vocabularies_differ() -> None:
    texts = instructions(seed=10, count=300)
    source = new_index(texts[:100])
    vocab_start = source.vocab_size
    source.add([f"n{i}" for i in range(100)], texts[100:200])
    entries, vocab = source.export(100, vocab_start)
    entries = entries.filter(pa.array([i % 3 != 0 for i in range(entries.num_rows)]))  # rows dropped later

    # Same prefix, but this index met some of the round's tokens first: the stored ids are remapped.
    remapped = new_index(texts[:100])
    remapped.add(["late"], ["zebra quantum " + texts[150] + " " + texts[160]])
    remapped.load(entries, vocab)
    # Another prefix (other seeds): the stored ids mean nothing here, so the texts are tokenized again.
    retokenized = new_index(texts[200:300])
    with pytest.warns(UserWarning, match="re-tokenizing"):
        retokenized.load(entries, vocab)

    for index, offset in ((remapped, 101), (retokenized, 100)):
        assert index.ids[offset:] == entries.column("id").to_pylist()
        for position in range(offset, len(index)):
            assert _tokens_of(index, position) == rouge_tokenize(index.texts[position])
    with pytest.raises(ValueError, match="tokenizer"):
        PoolIndex.empty("multilingual").load(entries, vocab)


def test_export_tables() -> None:
    index = new_index(["Write a poem.", "Write a story!"])
    entries, vocab = index.export(1, 3)
    assert entries.column("id").to_pylist() == ["p1"] and entries.column("token_ids").to_pylist() == [
        [0, 1, 3]
    ]
    assert entries.schema.field("token_ids").type == pa.list_(pa.int32())
    assert vocab.to_pylist() == [{"token": "story", "token_id": 3}]
    assert index.vocab_size == 4
    nothing_new = index.export(len(index), index.vocab_size)
    index.load(*nothing_new)
    assert len(index) == 2 and index.vocab_size == 4
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        index.add(["a", "b"], ["text"])


# -- Dask ----------------------------------------------------------------------------------------------------


def test_dask_cluster_gives_identical_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    distributed = pytest.importorskip("distributed")
    monkeypatch.setattr(index_module, "BLOCK_SIZE", 128)  # several shards from a small pool
    texts = instructions(seed=12, count=1100)
    pool, candidates = texts[:700], texts[700:]
    ids = [f"c{i}" for i in range(len(candidates))]
    local = deduplicate(ids, candidates, new_index(pool))
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster:
        remote = deduplicate(ids, candidates, new_index(pool), dask_address=cluster.scheduler_address)
    assert [as_tuple(d) for d in remote] == [as_tuple(d) for d in local]
