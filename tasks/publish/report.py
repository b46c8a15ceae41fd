"""A round's self-contained HTML report: drawn from its statistics, written into the store, linked in the UI.

The statistics come from tasks/publish/report_stats.py; `render_html` draws them (matplotlib plots and the
requests timeline, all inline SVG) into the page template tasks/publish/report.html; `publish_report` writes
the page into the round's folder and links it from a Prefect artifact.
"""

import base64
import html
import io
import string
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.audit import AuditManifest
from tasks.publish.report_stats import ROUGE_BINS, RoundReport, build_report, histogram, summary
from tasks.publish.timeline import timeline_svg
from tasks.resources.redact import redact_url
from tasks.resources.store.rounds import Store

REPORT_KEY = "selfinstruct-round-report"
REPORT_FILE = "report.html"
TEMPLATE = "report.html"  # beside this module; the page's $placeholders are filled by `render_html`

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


def load_section(report: RoundReport) -> str:
    """HTML of the server-load section: the requests timeline and wall time and tokens per stage."""
    load = report.load
    if load is None:
        return '<p class="note">not recorded for this round</p>'
    rows: list[tuple[object, ...]] = [
        (
            stage,
            s.requests,
            s.prompts,
            f"{s.wall_s:.1f}",
            s.prompt_tokens,
            "-" if s.cached_prompt_tokens is None else s.cached_prompt_tokens,
            s.completion_tokens,
        )
        for stage, s in load.stages.items()
    ]
    cached = "-" if load.cached_prompt_tokens is None else load.cached_prompt_tokens
    rows.append(("all", "", "", f"{load.wall_s:.1f}", load.prompt_tokens, cached, load.completion_tokens))
    round_wall = (
        "" if load.round_wall_s is None else f"; the round took {load.round_wall_s:.1f} s from open to commit"
    )
    return "\n".join(
        [
            f'<p class="note">Server busy: {load.concurrency} requests (the full concurrency) were in flight '
            f"{load.busy_fraction:.0%} of the {load.wall_s:.1f} s from the first request sent to the last "
            f"answer received{round_wall}. Wall time of a stage: its first send to its last receive (stages "
            "may overlap).</p>",
            timeline_svg(report.requests, load.concurrency, load.busy_fraction),
            _table(
                [
                    "stage",
                    "requests",
                    "prompts",
                    "wall s",
                    "prompt tokens",
                    "cached prompt tokens",
                    "completion tokens",
                ],
                rows,
            ),
        ]
    )


def render_html(report: RoundReport) -> str:
    """The report as one self-contained HTML page (plots inline as SVG, no external resources).

    The page is tasks/publish/report.html with its `$name` placeholders filled; every value is escaped here.
    """
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
    template = string.Template(
        resources.files("tasks.publish").joinpath(TEMPLATE).read_text(encoding="utf-8")
    )
    return template.substitute(
        title=html.escape(f"Self-Instruct round {report.round}"),
        store=html.escape(report.store_url),
        counts_table=_table(["count", "value"], sorted(report.counts.items())),
        load=load_section(report),
        growth_plot=_figure_uri(_growth_figure(report)),
        growth_table=_table(
            ["round", "pool before", "kept", "pool after", "instances"],
            [(p.round, p.pool_before, p.kept, p.pool_after, p.instances) for p in report.growth],
        ),
        rouge_threshold=html.escape(str(report.rouge_threshold)),
        rouge_plot=_figure_uri(_rouge_figure(report)),
        lengths_plot=_figure_uri(_lengths_figure(report)),
        lengths_table=_table(
            ["text", "n", "mean words", "median", "max"],
            [(name, s["n"], f"{s['mean']:.1f}", f"{s['median']:g}", s["max"]) for name, s in lengths],
        ),
        empty_inputs=report.empty_inputs,
        rejections_plot=rejections_plot,
        rejections_table=_table(["stage: reason", "count"], report.rejections),
        audit="\n".join(audit_section(report.audit)),
        verbs_plot=verbs_plot,
        verbs_table=_table(
            ["verb", "count", "top objects"],
            [
                (v.verb, v.count, ", ".join(f"{noun} ({count})" for noun, count in v.objects))
                for v in report.verbs
            ],
        ),
    )


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
        store.read_table(number, "requests").to_pylist() if manifests[-1].load is not None else (),
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
