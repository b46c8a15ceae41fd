"""`selfinstruct audit`: judge a sample of a committed round on the three questions of section 3.3.

Prefect is imported inside the command, after the store, round and judge are checked, so bad input fails
in well under a second with nothing written.
"""

from typing import Annotated

import typer
from rich.table import Table

from selfinstruct import processes
from selfinstruct.console import console, fail
from selfinstruct.inputs import (
    JudgeModelOption,
    JudgeUrlOption,
    judge_urls,
    load_settings,
    local_data_dir,
    open_store_or_fail,
    prepare_prefect_env,
)


def audit(
    round_: Annotated[
        int | None, typer.Option("--round", min=1, help="Committed round to audit (default: the newest).")
    ] = None,
    sample: Annotated[
        int, typer.Option(min=1, max=100_000, help="Instructions to judge, one random instance each.")
    ] = 200,
    seed: Annotated[int, typer.Option(help="Seeds the sample.")] = 0,
    judge_url: JudgeUrlOption = None,
    judge_model: JudgeModelOption = None,
    store: Annotated[str | None, typer.Option(help="Store root URL (folder or s3://bucket/prefix).")] = None,
) -> None:
    """Audit a round's quality with an LLM judge; prints the three rates with 95% intervals."""
    from schemas.audit import AuditParams
    from tasks.quality.audit import resolve_round
    from tasks.resources.store.files import StoreError

    settings = load_settings(store)
    store_obj = open_store_or_fail(settings)
    try:
        number = resolve_round(store_obj, round_)
    except StoreError as error:
        fail(str(error))
        raise
    urls = judge_urls(judge_url, judge_model, settings)
    params = AuditParams(
        store_url=settings.store_url,
        round=number,
        sample=sample,
        seed=seed,
        judge_urls=urls,
        judge_model=judge_model,
    )
    prepare_prefect_env(local_data_dir(settings))
    processes.guard_child_processes()

    from flows.audit import audit as audit_flow
    from schemas.audit import RateEstimate
    from tasks.quality.audit import QUESTION_TEXT, format_rate

    try:
        summary = audit_flow(params)
    except Exception as error:  # the flow already logged the traceback
        fail(f"audit failed: {error}", code=1)
        raise
    table = Table(title=f"Round {number} audit ({summary['sampled']} judged, seed {seed})")
    for column in ("question", "yes / judged", "rate [95% CI]"):
        table.add_column(column, justify="left" if column == "question" else "right")
    for raw in summary["rates"]:  # type: ignore[attr-defined]
        rate = RateEstimate.model_validate(raw)
        table.add_row(QUESTION_TEXT[rate.question], f"{rate.yes} / {rate.n}", format_rate(rate))
    console.print(table)
    console.print(f"unparseable judge answers: {summary['unparseable']} of {summary['sampled']}")
    console.print(f"audit: {summary['location']}")


def register(app: typer.Typer) -> None:
    """Add the `audit` command to the top-level app."""
    app.command(name="audit")(audit)
