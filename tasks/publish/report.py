"""A self-contained HTML report of one bootstrap round: the statistics of section 3 of Wang et al. (2022).

Pure functions compute the statistics from plain values; `render_html` draws them with matplotlib into
one HTML file with inline images; `publish_report` writes it into the store and links it from the UI.
"""

import base64
import html
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas import RoundManifest
from schemas.audit import AuditManifest
from tasks.resources.redact import redact_url
from tasks.resources.store.rounds import Store

REPORT_KEY = "selfinstruct-round-report"
REPORT_FILE = "report.html"
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


# -- pure statistics -------------------------------------------------------------------------------


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


def build_report(
    store_url: str,
    manifests: Sequence[RoundManifest],
    number: int,
    instructions: Sequence[dict[str, Any]],
    instances: Sequence[dict[str, Any]],
    rejected: Sequence[dict[str, Any]],
) -> RoundReport:
    """Compute a round's statistics from its rows.

    Args:
        store_url: Where the store is (shown in the header).
        manifests: Manifests of the committed rounds up to and including `number`.
        number: The round reported on.
        instructions, instances, rejected: Rows of the round's Parquet files (as dicts).

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
    )


# -- rendering -------------------------------------------------------------------------------------


def _figure_uri(figure: Any) -> str:
    """A matplotlib figure as an SVG data URI (text kept as text: small and searchable)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "selfinstruct"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode()


def _growth_figure(report: RoundReport) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.2))
    axes = figure.add_subplot()
    rounds = [p.round for p in report.growth]
    axes.bar(rounds, [p.kept for p in report.growth], color="#9ecae1", label="kept in round")
    axes.set_xlabel("round")
    axes.set_ylabel("instructions kept")
    pool = axes.twinx()
    pool.plot(rounds, [p.pool_after for p in report.growth], color="#08519c", marker="o", label="pool size")
    pool.set_ylabel("pool size")
    axes.set_xticks(rounds)
    figure.legend(loc="upper left", bbox_to_anchor=(0.1, 0.95), fontsize="small")
    return figure


def _rouge_figure(report: RoundReport) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.2))
    axes = figure.add_subplot()
    edges = [i / ROUGE_BINS for i in range(ROUGE_BINS)]
    kept = histogram(report.rouge_kept)
    rejected = histogram(report.rouge_rejected)
    width = 1 / ROUGE_BINS
    axes.bar(edges, kept, width=width, align="edge", color="#3182bd", label="kept")
    axes.bar(edges, rejected, width=width, align="edge", bottom=kept, color="#de2d26", label="rejected")
    axes.axvline(report.rouge_threshold, color="black", linestyle="--", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_xlabel("ROUGE-L F with the most similar pool instruction")
    axes.set_ylabel("new instructions")
    axes.legend(fontsize="small")
    return figure


def _lengths_figure(report: RoundReport) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.6, 2.8))
    panels = (
        ("instruction", report.instruction_words),
        ("non-empty input", report.input_words),
        ("output", report.output_words),
    )
    for position, (name, values) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 3, position)
        if values:
            axes.hist(values, bins=min(30, max(5, len(set(values)))), color="#6baed6")
        axes.set_title(f"{name} ({len(values)})", fontsize="medium")
        axes.set_xlabel("words")
    figure.tight_layout()
    return figure


def _rejections_figure(report: RoundReport) -> Any:
    from matplotlib.figure import Figure

    rows = report.rejections[:15]
    figure = Figure(figsize=(6.4, 0.4 + 0.3 * max(len(rows), 1)))
    axes = figure.add_subplot()
    axes.barh([label for label, _ in rows][::-1], [count for _, count in rows][::-1], color="#fc9272")
    axes.set_xlabel("rejected items")
    return figure


def _verbs_figure(report: RoundReport) -> Any:
    """Two rings like the paper's Figure 2: verbs inside, their top objects outside."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 6.4))
    axes = figure.add_subplot()
    axes.set_aspect("equal")
    inner = [v.count for v in report.verbs]
    outer: list[int] = []
    outer_labels: list[str] = []
    for stats in report.verbs:
        for noun, count in stats.objects:
            outer.append(count)
            outer_labels.append(noun)
        rest = stats.count - sum(count for _, count in stats.objects)
        if rest > 0:
            outer.append(rest)
            outer_labels.append("")
    total = sum(inner)
    axes.pie(
        inner,
        radius=0.7,
        labels=[v.verb if v.count / total > 0.02 else "" for v in report.verbs],
        labeldistance=0.55,
        textprops={"fontsize": 8},
        wedgeprops={"width": 0.4, "edgecolor": "white"},
    )
    axes.pie(
        outer,
        radius=1.0,
        labels=[
            label if count / total > 0.01 else "" for label, count in zip(outer_labels, outer, strict=True)
        ],
        labeldistance=0.83,
        rotatelabels=True,
        textprops={"fontsize": 6},
        wedgeprops={"width": 0.3, "edgecolor": "white", "alpha": 0.6},
    )
    return figure


# Table 2 of Wang et al. (2022): 200 GPT-3 instructions judged by an expert annotator.
PAPER_AUDIT = {
    "valid_instruction": 92,
    "appropriate_input": 79,
    "correct_output": 58,
    "all_three": 54,
}


def audit_section(audit: AuditManifest | None) -> list[str]:
    """HTML of the quality-audit section (empty when the round has no audit)."""
    if audit is None:
        return []
    from tasks.quality.audit import QUESTION_TEXT, format_rate

    return [
        "<h2>Quality audit</h2>",
        f'<p class="note">{audit.sampled} of {audit.instructions_in_round} instructions, one random '
        f"instance each (seed {audit.sample_seed}), judged by {html.escape(audit.judge_model)} "
        f"(prompt version {audit.prompt_version[:12]}); {audit.unparseable} answers were unparseable and "
        "are left out of the rates. 95% Wilson intervals. The paper's expert judgement of GPT-3 data is "
        "shown for reference (Table 2 of Wang et al. 2022).</p>",
        _table(
            ["question", "yes / judged", "rate [95% CI]", "paper"],
            [
                (QUESTION_TEXT[r.question], f"{r.yes} / {r.n}", format_rate(r), f"{PAPER_AUDIT[r.question]}%")
                for r in audit.rates
            ],
        ),
        f'<p class="note">audit {html.escape(audit.audit_id)}</p>',
    ]


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 64em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
img { max-width: 100%; } .note { color: #666; font-size: 0.9em; }
"""


def render_html(report: RoundReport) -> str:
    """The report as one self-contained HTML page (plots inline as SVG data URIs, no external resources)."""
    uris = {
        "growth": _figure_uri(_growth_figure(report)),
        "rouge": _figure_uri(_rouge_figure(report)),
        "lengths": _figure_uri(_lengths_figure(report)),
    }
    rejections_plot = (
        f'<img alt="rejections" src="{_figure_uri(_rejections_figure(report))}">'
        if report.rejections
        else "<p>none</p>"
    )
    verbs_plot = (
        f'<img alt="verbs and objects" src="{_figure_uri(_verbs_figure(report))}">'
        if report.verbs
        else "<p>no leading verbs found</p>"
    )
    lengths = [
        ("instruction", summary(report.instruction_words)),
        ("non-empty input", summary(report.input_words)),
        ("output", summary(report.output_words)),
    ]
    title = f"Self-Instruct round {report.round}"
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">store {html.escape(report.store_url)}</p>',
        "<h2>Counts</h2>",
        _table(["count", "value"], sorted(report.counts.items())),
        "<h2>Pool growth</h2>",
        f'<img alt="pool growth" src="{uris["growth"]}">',
        _table(
            ["round", "pool before", "kept", "pool after", "instances"],
            [(p.round, p.pool_before, p.kept, p.pool_after, p.instances) for p in report.growth],
        ),
        "<h2>ROUGE-L similarity of new instructions to the pool</h2>",
        f'<p class="note">Max ROUGE-L F of each candidate against the whole pool; candidates above '
        f"{report.rouge_threshold} (dashed line) are rejected. Cf. Figure 3 of Wang et al. (2022).</p>",
        f'<img alt="ROUGE-L histogram" src="{uris["rouge"]}">',
        "<h2>Lengths</h2>",
        f'<img alt="length distributions" src="{uris["lengths"]}">',
        _table(
            ["text", "n", "mean words", "median", "max"],
            [(name, s["n"], f"{s['mean']:.1f}", f"{s['median']:g}", s["max"]) for name, s in lengths],
        ),
        f'<p class="note">{report.empty_inputs} instances have an empty input.</p>',
        "<h2>Rejections per reason</h2>",
        rejections_plot,
        _table(["stage: reason", "count"], report.rejections),
        *audit_section(report.audit),
        "<h2>Leading verbs and their direct objects</h2>",
        '<p class="note">Heuristic: first word as the verb, next noun-ish word as its object. '
        "Cf. Figure 2 of Wang et al. (2022).</p>",
        verbs_plot,
        _table(
            ["verb", "count", "top objects"],
            [
                (v.verb, v.count, ", ".join(f"{noun} ({count})" for noun, count in v.objects))
                for v in report.verbs
            ],
        ),
        "</body></html>",
    ]
    return "\n".join(parts)


# -- store and Prefect -----------------------------------------------------------------------------


def load_report(store: Store, number: int | None = None) -> RoundReport:
    """Read a committed round (the newest by default) and the manifests before it, and compute its report.

    Raises:
        StoreError: When the round is not committed (or the store has none).
    """
    from tasks.resources.store.files import StoreError

    committed = store.committed_rounds()
    if number is None:
        if not committed:
            raise StoreError(f"store {redact_url(store.url)} has no committed round")
        number = committed[-1]
    if number not in committed:
        raise StoreError(f"round {number} of {redact_url(store.url)} is not committed")
    from tasks.quality.audit import read_audits

    manifests = [store.read_manifest(n) for n in committed if n <= number]
    report = build_report(
        store.location(number).rsplit("/rounds/", 1)[0],
        manifests,
        number,
        store.read_table(number, "instructions").to_pylist(),
        store.read_table(number, "instances").to_pylist(),
        store.read_table(number, "rejected").to_pylist(),
    )
    audits = read_audits(store, number)
    report.audit = audits[-1] if audits else None
    return report


def render_report(store: Store, number: int | None = None) -> tuple[int, str]:
    """Compute and render a round's report (the newest round by default).

    Returns:
        (round number, the HTML page)
    """
    report = load_report(store, number)
    return report.round, render_html(report)


def save_report(store: Store, number: int, page: str) -> str:
    """Write a rendered report into the round's folder as report.html; returns its location.

    The round's Parquet files stay immutable; the report is derived from them and may be rewritten.
    """
    store.write_bytes(number, REPORT_FILE, page.encode())
    return f"{store.location(number)}/{REPORT_FILE}"


def write_report(store: Store, number: int | None = None) -> tuple[int, str]:
    """Render a round's report and write it into the store.

    Returns:
        (round number, location of the written report)
    """
    rendered, page = render_report(store, number)
    return rendered, save_report(store, rendered, page)


# Presigned report links stay valid this long (7 days: the longest S3 SigV4 allows).
PRESIGN_EXPIRES_S = 7 * 24 * 3600


def report_path(number: int) -> str:
    """Where a round's report lies below the store root, and below a report server's base URL."""
    return f"/rounds/round={number:05d}/{REPORT_FILE}"


def report_link(store: Store, number: int, report_url: str | None = None) -> str:
    """A link to a round's report that opens in a browser from the Prefect UI.

    Args:
        store: The round store.
        number: A round with a report.
        report_url: Base URL of a report server for this store (`stack up` starts one), if any.

    Returns:
        The report server's page when there is one; else a presigned HTTPS URL for an object store, or a
        file:// URL for a local folder (which browsers open only from the same machine).
    """
    if report_url:
        return f"{report_url.rstrip('/')}{report_path(number)}"
    signed = store.signed_url(number, REPORT_FILE, PRESIGN_EXPIRES_S)
    if signed is not None:
        return signed
    location = f"{store.location(number)}/{REPORT_FILE}"
    return location if "://" in location else f"file://{location}"


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(store: Store, round: int, report_url: str | None = None) -> str:
    """Write the round's HTML report into the store and link it from a Prefect link artifact.

    Args:
        store: The round store.
        round: A committed round.
        report_url: Base URL of a report server for this store, if one runs (Settings.report_url).

    Returns:
        The report's location in the store.
    """
    from prefect.artifacts import create_link_artifact

    number, location = write_report(store, round)
    create_link_artifact(
        link=report_link(store, number, report_url),
        link_text=f"round {number} report",
        key=REPORT_KEY,
        description=f"Round {number} of {redact_url(store.url)}: pool growth, similarity, lengths, verbs",
    )
    return location
