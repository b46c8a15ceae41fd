"""ROUGE-L dedup: tasks.round.dedup.greedy.deduplicate against rouge_score used the way Self-Instruct uses it.

Run: `python benchmarks/dedup.py [--quick]`. Prints one table:

(a) the reference, Self-Instruct's loop: per candidate a new `multiprocessing.Pool(num_cpus)` maps
    `partial(rouge_scorer._score_lcs, new_instruction_tokens)` over every pool instruction's tokens;
    measured on a subset and reported as pairs/s;
(b) `deduplicate` on the same texts: pairs/s on large candidate x pool matrices, and the decisions on the
    reference subset compared with the reference's (mismatches must be 0);
(c) a simulated bootstrap: rounds of candidates deduplicated greedily against a pool growing to 52,000
    instructions with lineage on: wall time and peak memory.

The instruction text is synthetic but instruction-like: templates filled from word lists plus a long tail of
rare words, with a share of light rewrites of earlier instructions so that near-duplicates occur.
"""

import argparse
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool, get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table
from rouge_score import rouge_scorer

from tasks.round.dedup.greedy import deduplicate
from tasks.round.dedup.index import PoolIndex

_VERBS = (
    "write describe explain summarize classify translate list generate create identify compare rewrite find "
    "suggest design outline analyze evaluate convert calculate predict recommend determine extract propose "
    "draft compose plan estimate rank sort group detect correct improve simplify paraphrase critique review "
    "organize schedule brainstorm debug optimize prove solve derive illustrate define interpret categorize "
    "tag label annotate answer argue justify defend contrast imagine invent name choose select verify"
)
_NOUNS = (
    "poem story essay email letter tweet recipe plan list summary description review headline slogan joke "
    "riddle question answer argument report proposal schedule budget itinerary menu speech dialogue script "
    "article blog post advertisement product apology invitation resume cover letter lesson quiz puzzle "
    "function program query table chart timeline checklist guide manual policy contract memo press release "
    "toast eulogy limerick haiku sonnet song lyric tagline mission statement abstract outline thesis "
    "hypothesis experiment survey interview routine workout diet habit goal strategy pitch review comment "
    "feedback complaint request message note caption title name nickname password username address"
)
_ADJECTIVES = (
    "short long funny formal informal persuasive detailed brief creative simple technical friendly polite "
    "concise vivid sad happy historical scientific sarcastic serious playful professional casual catchy "
    "memorable original balanced neutral positive negative optimistic critical humble confident gentle "
    "honest clear precise rough polished elegant modern classic quirky dramatic calm urgent"
)
_TOPICS = (
    "climate change|the ocean|machine learning|a cat|the city of Paris|ancient Rome|healthy eating|"
    "remote work|a job interview|the solar system|friendship|a rainy day|electric cars|coffee|the internet|"
    "space travel|a birthday party|renewable energy|public transport|a small business|music|video games|"
    "the stock market|volcanoes|photosynthesis|the French revolution|quantum computing|a lost dog|"
    "social media|time management|the human brain|gardening|a haunted house|the moon landing|cryptocurrency|"
    "world war two|a first date|learning a language|the olympics|a hiking trip|cloud computing|vaccines|"
    "the printing press|black holes|a chess game|sleep|recycling|a bakery|the desert|a marathon|democracy|"
    "an old lighthouse|bees|tea|a new smartphone|online privacy|a school trip|the rainforest|inflation|"
    "a wedding|robots|dinosaurs"
)
_AUDIENCES = (
    "children|a teenager|your boss|a customer|a friend|a scientist|beginners|experts|your grandmother|"
    "a teacher|investors|new employees|a landlord|a doctor|tourists|students|voters|a neighbor|"
    "the city council|fans"
)
_SYLLABLES = "ka lo mi ne ru sa ti vo pe da ge fi hu ja xo ze qua bri stel morn dra ven ly tor"
VERBS, NOUNS, ADJECTIVES = _VERBS.split(), _NOUNS.split(), _ADJECTIVES.split()
TOPICS, AUDIENCES = _TOPICS.split("|"), _AUDIENCES.split("|")
OPENERS = (
    "{V} a {A} {N} about {T}.",
    "{V} a {N} about {T} for {U}.",
    "Please {v} a {N} about {T}.",
    "Can you {v} a {A} {N} on {T}?",
    "I need you to {v} a {N} about {T} that {U} would enjoy.",
    "Given a {N} about {T}, {v} it.",
    "{V} {X} {A} ideas for a {N} about {T}.",
    "You are given a {N}. {V} whether it is {A} or {A2}.",
    "In {X} words or fewer, {v} {T} to {U}.",
    "Tell me how to {v} a {N} about {T}.",
    "What is the best way to {v} a {A} {N} for {U}?",
    "Imagine you are {U}. {V} a {N} about {T}.",
    "Here is a {N}: {v} the parts that mention {T}.",
    "{V} the following {N} so that it sounds more {A}.",
    "Using {X} bullet points, {v} why {T} matters to {U}.",
)
PREFIXES = (
    "Please",
    "For {U},",
    "As {U},",
    "Quickly",
    "Your task:",
    "Step one:",
    "Without {W},",
    "If you can,",
    "Pretend you know {T} well and",
    "Using what you know about {T},",
    "In the style of {U},",
    "Here is a challenge:",
)
EXTENSIONS = (
    " Use a {A} tone.",
    " Keep it under {X} sentences.",
    " Then {v} a {N} that {U} could understand.",
    " Make sure to mention {T}.",
    " Explain your reasoning step by step.",
    " Avoid jargon and {v} any technical terms.",
    " The answer should be {A} and {A2}.",
    " Include a {A} title and a {N}.",
    " Do not use the word {W}.",
    " Start with the word {W}.",
    " Output the result as a {N}.",
    " Compare it with {T}.",
)


def _rare_words(rng: random.Random, count: int) -> list[str]:
    syllables = _SYLLABLES.split()
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(count)]


@dataclass
class InstructionGenerator:
    """Endless instruction-like texts from a seeded RNG; some are light rewrites of earlier ones."""

    seed: int = 0
    rewrite_share: float = 0.12

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._rare = _rare_words(random.Random(self.seed + 1), 20_000)
        self._recent: list[str] = []

    def _word(self) -> str:
        # A long tail of rare words, like names and domain terms in real instructions.
        return self._rng.choice(self._rare) if self._rng.random() < 0.5 else self._rng.choice(NOUNS)

    def _fill(self, template: str) -> str:
        rng = self._rng
        topic = rng.choice(TOPICS)
        if rng.random() < 0.6:
            topic = f"{topic} and {self._word()}" if rng.random() < 0.5 else f"the {self._word()} of {topic}"
        verb = rng.choice(VERBS)
        return template.format(
            V=verb.capitalize(),
            v=verb,
            A=rng.choice(ADJECTIVES),
            A2=rng.choice(ADJECTIVES),
            N=self._word() if rng.random() < 0.3 else rng.choice(NOUNS),
            T=topic,
            U=rng.choice(AUDIENCES),
            X=rng.randint(2, 12),
            W=self._word(),
        )

    def _fresh(self) -> str:
        rng = self._rng
        text = self._fill(rng.choice(OPENERS))
        if rng.random() < 0.4:
            text = self._fill(rng.choice(PREFIXES)) + " " + text
        for _ in range(rng.choices((0, 1, 2, 3), weights=(3, 4, 2, 1))[0]):
            text += self._fill(rng.choice(EXTENSIONS))
        return text

    def _rewrite(self, text: str) -> str:
        words = text.split()
        rng = self._rng
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(words))
            words[i] = rng.choice((self._word(), rng.choice(ADJECTIVES), words[i].upper() + "!"))
        return " ".join(words)

    def __iter__(self) -> Iterator[str]:
        while True:
            if self._recent and self._rng.random() < self.rewrite_share:
                text = self._rewrite(self._rng.choice(self._recent))
            else:
                text = self._fresh()
            self._recent.append(text)
            if len(self._recent) > 20_000:
                self._recent = self._recent[-10_000:]
            yield text

    def take(self, count: int) -> list[str]:
        """The next `count` instructions."""
        return [text for text, _ in zip(self, range(count), strict=False)]


# -- (a) the reference ---------------------------------------------------------------------------------------


def reference_decisions(
    candidates: list[str], pool: list[str], threshold: float, num_cpus: int
) -> tuple[list[tuple[bool, float]], float]:
    """Self-Instruct's own loop (bootstrap_instructions.py): (keep, max F) per candidate and its wall time."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    all_tokens = [scorer._tokenizer.tokenize(text) for text in pool]
    decisions = []
    start = time.perf_counter()
    for candidate in candidates:
        new_tokens = scorer._tokenizer.tokenize(candidate)
        with Pool(num_cpus) as workers:
            scores = workers.map(partial(rouge_scorer._score_lcs, new_tokens), all_tokens)
        best = max(score.fmeasure for score in scores)
        keep = not best > threshold
        decisions.append((keep, best))
        if keep:
            all_tokens.append(new_tokens)
    return decisions, time.perf_counter() - start


# -- (b) and (c) ---------------------------------------------------------------------------------------------


def ours_on_subset(candidates: list[str], pool: list[str], threshold: float) -> list[tuple[bool, float]]:
    """deduplicate on the reference's subset (lineage on and off must agree): (keep, max F) per candidate."""
    verdicts = []
    for lineage in (True, False):
        index = PoolIndex.empty()
        index.add([f"p{i}" for i in range(len(pool))], pool)
        ids = [f"c{i}" for i in range(len(candidates))]
        decisions = deduplicate(ids, candidates, index, threshold=threshold, lineage=lineage)
        verdicts.append([(d.keep, d.max_score) for d in decisions])
    if verdicts[0] != verdicts[1]:
        raise AssertionError("lineage changed a decision")
    return verdicts[0]


def ours_throughput(candidates: list[str], pool: list[str], lineage: bool) -> float:
    """Candidate x pool pairs per second of one deduplicate call (in-batch pairs not counted)."""
    index = PoolIndex.empty()
    index.add([f"p{i}" for i in range(len(pool))], pool)
    start = time.perf_counter()
    deduplicate([f"c{i}" for i in range(len(candidates))], candidates, index, lineage=lineage)
    return len(candidates) * len(pool) / (time.perf_counter() - start)


@dataclass
class Bootstrap:
    """Outcome of the simulated bootstrap."""

    rounds: int
    candidates: int
    kept: int
    pairs: int
    seconds: float
    cpu_seconds: float
    rss_start_mib: float
    peak_rss_mib: float


def simulate_bootstrap(target: int, round_size: int, seed_count: int, seed: int) -> Bootstrap:
    """Rounds of candidates deduplicated (lineage on) until the pool holds `target` instructions.

    Only the deduplicate calls are timed; run it in a fresh process so that max RSS is its own.
    """
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    generator = iter(InstructionGenerator(seed=seed))
    index = PoolIndex.empty()
    index.add([f"seed{i}" for i in range(seed_count)], [next(generator) for _ in range(seed_count)])
    rounds = candidates = pairs = 0
    seconds = 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    while len(index) < target:
        rounds += 1
        batch = [next(generator) for _ in range(round_size)]
        size_before = len(index)
        start = time.perf_counter()
        decisions = deduplicate([f"r{rounds}-{i}" for i in range(len(batch))], batch, index, lineage=True)
        seconds += time.perf_counter() - start
        kept_before = 0
        for decision in decisions:
            pairs += size_before + kept_before
            kept_before += decision.keep
        candidates += len(batch)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start  # includes generating the texts, a few seconds
    kept = len(index) - seed_count
    return Bootstrap(rounds, candidates, kept, pairs, seconds, cpu, rss_start, usage.ru_maxrss / 1024)


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    """Run the three measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    args = parser.parse_args()
    console = Console()
    cores = len(os.sched_getaffinity(0))
    ref_candidates, ref_pool = (10, 2_000) if args.quick else (30, 5_000)
    big_candidates, big_pool = (500, 20_000) if args.quick else (2_000, 52_000)
    target, round_size = (10_000, 2_000) if args.quick else (52_000, 4_000)

    texts = InstructionGenerator(seed=7).take(ref_pool + ref_candidates)
    pool, candidates = texts[:ref_pool], texts[ref_pool:]
    reference, ref_seconds = reference_decisions(candidates, pool, 0.7, cores)
    ref_pairs = sum(ref_pool + sum(keep for keep, _ in reference[:i]) for i in range(len(reference)))
    ref_rate = ref_pairs / ref_seconds
    ours = ours_on_subset(candidates, pool, 0.7)
    mismatches = sum(a != b for a, b in zip(reference, ours, strict=True))

    texts = InstructionGenerator(seed=11).take(big_pool + big_candidates)
    rate_on = ours_throughput(texts[big_pool:], texts[:big_pool], lineage=True)
    rate_off = ours_throughput(texts[big_pool:], texts[:big_pool], lineage=False)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as child:
        boot = child.submit(simulate_bootstrap, target, round_size, 175, 3).result()

    table = Table(title=f"ROUGE-L dedup, {cores} cores, {cpu_model()}, Python {platform.python_version()}")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_row(
        f"(a) reference: Self-Instruct loop, {ref_candidates} cand. x {ref_pool:,} pool",
        f"{ref_rate:,.0f} pairs/s",
    )
    table.add_row(
        f"(b) ours, lineage on, {big_candidates:,} x {big_pool:,}", f"{rate_on / 1e6:,.1f} M pairs/s"
    )
    table.add_row(
        f"(b) ours, lineage off, {big_candidates:,} x {big_pool:,}", f"{rate_off / 1e6:,.1f} M pairs/s"
    )
    table.add_row(
        "(b) speedup over the reference (lineage on / off)",
        f"{rate_on / ref_rate:,.0f}x / {rate_off / ref_rate:,.0f}x",
    )
    rejected = sum(not keep for keep, _ in reference)
    table.add_row(
        "(b) decision and max-F mismatches vs reference",
        f"{mismatches} of {len(reference)} ({rejected} rejected)",
    )
    table.add_row(
        f"(c) bootstrap to {target:,}: rounds x candidates",
        f"{boot.rounds} x {round_size:,} = {boot.candidates:,}",
    )
    table.add_row("(c) kept / pairs compared", f"{boot.kept:,} / {boot.pairs / 1e9:,.2f} G")
    table.add_row("(c) CPU time of its process (user + sys)", f"{boot.cpu_seconds:,.1f} s")
    table.add_row(
        "(c) wall time (lineage on)",
        f"{boot.seconds:,.1f} s ({boot.pairs / boot.seconds / 1e6:,.1f} M pairs/s)",
    )
    table.add_row(
        "(c) peak memory: max RSS of its process (at start)",
        f"{boot.peak_rss_mib:,.0f} MiB ({boot.rss_start_mib:,.0f})",
    )
    console.print(table)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    console.print(
        f"load average at the end (1, 5, 15 min): {load}; other work on the machine slows every row"
    )


if __name__ == "__main__":
    main()
