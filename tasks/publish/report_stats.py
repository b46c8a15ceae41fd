"""The statistics of a round report (section 3 of Wang et al., 2022), as pure functions of plain values.

`build_report` turns a round's rows into a `RoundReport`; tasks/publish/report.py draws and publishes it.
"""

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas import CompletionRecord, RoundManifest
from schemas.audit import AuditManifest
from schemas.records import GenerationLoad
from tasks.round.server_load import RequestSpan, request_spans

ROUGE_BINS = 20

# Words that sit between a verb and its object without being the object: articles, pronouns,
# quantifiers, prepositions and the adjectives instructions use most ("the following", "a short").
NOT_OBJECTS = frozenset(
    (  # noqa: SIM905 - a word list reads better as text
        "a an the this that these those me us him her them it you my your our their its his some any all "
        "each every one two three four five six seven eight nine ten few several many more most of to for "
        "with in on at from by about as into and or out up down following given new short brief simple "
        "single other same different whether if how what which who why when where whose best good"
    ).split()
)
# Leading words that are not the instruction's verb; the verb is the next word.
LEAD_IN = frozenset({"please", "now", "then", "also", "just", "kindly"})


@dataclass(frozen=True)
class GrowthPoint:
    """The pool before and after one committed round."""

    round: int
    pool_before: int
    kept: int
    instances: int

    @property
    def pool_after(self) -> int:
        """Pool size once the round's instructions joined it."""
        return self.pool_before + self.kept


def pool_growth(manifests: Iterable[RoundManifest]) -> list[GrowthPoint]:
    """Pool size and what each round added, in round order."""
    return [
        GrowthPoint(m.round, m.pool_size_before, m.counts.get("kept", 0), m.counts.get("instances", 0))
        for m in sorted(manifests, key=lambda m: m.round)
    ]


def histogram(
    values: Sequence[float], bins: int = ROUGE_BINS, low: float = 0.0, high: float = 1.0
) -> list[int]:
    """Counts of `values` in `bins` equal bins over [low, high]; `high` itself falls in the last bin.

    Values outside the range are clipped into the first or last bin.
    """
    counts = [0] * bins
    for value in values:
        # Multiply rather than divide by the bin width: 0.7 // 0.05 is 13 in floating point, 0.7 * 20 is 14.
        index = math.floor((value - low) * bins / (high - low))
        counts[min(max(index, 0), bins - 1)] += 1
    return counts


def word_count(text: str) -> int:
    """Number of whitespace-separated words, as the paper's length statistics count them."""
    return len(text.split())


def rejections_by_reason(rows: Iterable[tuple[str, str]]) -> list[tuple[str, int]]:
    """`stage: reason` labels with their counts, most frequent first (ties by label).

    Args:
        rows: (stage, reason) of each rejected item.
    """
    counts = Counter(f"{stage}: {reason}" for stage, reason in rows)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def verb_and_object(instruction: str) -> tuple[str | None, str | None]:
    """The leading verb of an instruction and the first noun-ish word after it.

    A heuristic stand-in for the paper's dependency parse: the first word is taken as the verb (after
    "please" and the like), and the object is the next word that is not an article, pronoun,
    quantifier, preposition, number or -ly adverb. Instructions that start as a question or with a
    clause ("Given ...", "What ...", "If ...") have no verb in this sense.
    """
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", instruction.lower())
    while words and words[0] in LEAD_IN:
        words = words[1:]
    if not words or words[0] in NOT_OBJECTS or words[0] in {"is", "are", "do", "does", "can", "given", "i"}:
        return None, None
    verb, rest = words[0], words[1:]
    for word in rest:
        if word not in NOT_OBJECTS and not word.endswith("ly") and "'" not in word:
            return verb, word
    return verb, None


@dataclass(frozen=True)
class VerbStats:
    """A frequent leading verb, how often it leads, and its most common objects."""

    verb: str
    count: int
    objects: list[tuple[str, int]]


def top_verbs(instructions: Iterable[str], verbs: int = 20, objects: int = 4) -> list[VerbStats]:
    """The most common leading verbs and, for each, its most common direct objects.

    Args:
        instructions: Instruction texts.
        verbs: How many verbs to keep.
        objects: How many objects to keep per verb.
    """
    verb_counts: Counter[str] = Counter()
    object_counts: dict[str, Counter[str]] = {}
    for text in instructions:
        verb, noun = verb_and_object(text)
        if verb is None:
            continue
        verb_counts[verb] += 1
        if noun is not None:
            object_counts.setdefault(verb, Counter())[noun] += 1
    ranked = sorted(verb_counts.items(), key=lambda item: (-item[1], item[0]))[:verbs]
    return [
        VerbStats(
            verb,
            count,
            sorted(object_counts.get(verb, Counter()).items(), key=lambda i: (-i[1], i[0]))[:objects],
        )
        for verb, count in ranked
    ]


def summary(values: Sequence[int]) -> dict[str, float]:
    """n, mean, median and max of a list of lengths (zeros when empty)."""
    if not values:
        return {"n": 0, "mean": 0.0, "median": 0.0, "max": 0}
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"n": len(values), "mean": sum(values) / len(values), "median": float(median), "max": ordered[-1]}


@dataclass
class RoundReport:
    """Everything the report shows, as plain values."""

    store_url: str
    round: int
    counts: dict[str, int]
    rouge_threshold: float
    growth: list[GrowthPoint]
    rouge_kept: list[float]  # candidates that passed dedup
    rouge_rejected: list[float]  # candidates rejected as too similar
    instruction_words: list[int]
    input_words: list[int]  # non-empty inputs only
    empty_inputs: int
    output_words: list[int]
    rejections: list[tuple[str, int]]
    verbs: list[VerbStats] = field(default_factory=list)
    audit: AuditManifest | None = None  # the newest quality audit of the round, when there is one
    load: GenerationLoad | None = None  # how busy the round kept the LLM servers, when recorded
    requests: list[RequestSpan] = field(default_factory=list)  # its HTTP requests, for the timeline


def build_report(
    store_url: str,
    manifests: Sequence[RoundManifest],
    number: int,
    instructions: Sequence[dict[str, Any]],
    instances: Sequence[dict[str, Any]],
    rejected: Sequence[dict[str, Any]],
    requests: Sequence[dict[str, Any]] = (),
) -> RoundReport:
    """Compute a round's statistics from its rows.

    Args:
        store_url: Where the store is (shown in the header).
        manifests: Manifests of the committed rounds up to and including `number`.
        number: The round reported on.
        instructions, instances, rejected: Rows of the round's Parquet files (as dicts).
        requests: Rows of its requests.parquet; only those its committing run sent are drawn (the
            manifest's load says since when).

    Returns:
        The report's values. ROUGE-L of candidates that passed dedup but lost every instance afterwards
        (rejection rows carrying max_rouge outside the dedup stage) counts with the kept ones, because
        dedup accepted them.

    Raises:
        ValueError: When `manifests` lacks round `number`.
    """
    manifest = next((m for m in manifests if m.round == number), None)
    if manifest is None:
        raise ValueError(f"no manifest of round {number} among those given")
    rouge_kept = [float(r["max_rouge"]) for r in instructions if r.get("max_rouge") is not None]
    rouge_kept += [
        float(r["max_rouge"]) for r in rejected if r["stage"] != "dedup" and r.get("max_rouge") is not None
    ]
    inputs = [str(r["input"] or "") for r in instances]
    load = manifest.load
    spans = (
        []
        if load is None
        else request_spans(
            (CompletionRecord.model_validate(r) for r in requests), load.per_prompt_tokens, load.started_at
        )
    )
    return RoundReport(
        store_url=store_url,
        round=number,
        counts=dict(manifest.counts),
        rouge_threshold=manifest.config.rouge_threshold,
        growth=pool_growth(m for m in manifests if m.round <= number),
        rouge_kept=rouge_kept,
        rouge_rejected=[
            float(r["max_rouge"])
            for r in rejected
            if r["stage"] == "dedup" and r.get("max_rouge") is not None
        ],
        instruction_words=[word_count(r["instruction"]) for r in instructions],
        input_words=[word_count(text) for text in inputs if text.strip()],
        empty_inputs=sum(1 for text in inputs if not text.strip()),
        output_words=[word_count(str(r["output"] or "")) for r in instances],
        rejections=rejections_by_reason((r["stage"], r["reason"]) for r in rejected),
        verbs=top_verbs(r["instruction"] for r in instructions),
        load=load,
        requests=spans,
    )
