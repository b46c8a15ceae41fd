"""`selfinstruct export`, `finetune` and `evaluate`: training data, LoRA fine-tunes and held-out evaluation.

Prefect and the training stack are imported inside the commands, after the store and arguments are checked,
so a bad argument fails in well under a second.
"""

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from selfinstruct.cli import console, fail, load_settings, local_data_dir, open_store, prepare_prefect_env

StoreOption = Annotated[str | None, typer.Option(help="Store root URL (folder or s3://bucket/prefix).")]
RoundsOption = Annotated[
    str | None, typer.Option(help="Committed rounds, inclusive: N, A:B, :B or A: (default: all).")
]


class Format(StrEnum):
    """Export formats."""

    jsonl = "jsonl"
    alpaca = "alpaca"
    sft = "sft"


def _where(store_obj: Any) -> str:
    """A store's root for messages, credentials removed."""
    from tasks.store import redact_url

    return redact_url(store_obj.url)


def _rounds_or_fail(store_obj: Any, spec: str | None) -> list[int]:
    """The committed rounds `spec` names, or a one-line error."""
    from tasks.export import ExportError, select_rounds

    try:
        return select_rounds(spec, store_obj.committed_rounds())
    except ExportError as error:
        fail(f"{error} (store {_where(store_obj)})")
        raise


def export(
    out: Annotated[Path, typer.Argument(help="JSONL file to write.")],
    fmt: Annotated[Format, typer.Option("--format", help="Row format.")] = Format.jsonl,
    rounds: RoundsOption = None,
    include_seeds: Annotated[
        bool, typer.Option("--include-seeds", help="Also export the seed tasks.")
    ] = False,
    seeds: Annotated[Path | None, typer.Option(help="Seed tasks JSONL (default: the shipped seeds).")] = None,
    max_instances: Annotated[
        int, typer.Option(min=1, max=100, help="Instances per instruction at most.")
    ] = 5,
    seed: Annotated[int, typer.Option(help="Seeds instance sampling, template choice and shuffling.")] = 42,
    store: StoreOption = None,
) -> None:
    """Write fine-tuning data from committed rounds as jsonl (with provenance), alpaca or sft rows."""
    from tasks.export import ExportError, TemplateError, write_export
    from tasks.seeds import SeedFileError

    store_obj = open_store(load_settings(store))
    try:
        result = write_export(store_obj, out, fmt.value, rounds, include_seeds, seeds, max_instances, seed)
    except (ExportError, SeedFileError, TemplateError) as error:
        fail(f"{error} (store {_where(store_obj)})" if isinstance(error, ExportError) else str(error))
        raise
    stats = result.stats
    table = Table(title=f"Export ({fmt.value})")
    table.add_column("source")
    table.add_column("rows", justify="right")
    for source, count in stats.rows_per_source.items():
        table.add_row("seeds" if source == "seeds" else f"round {source}", str(count))
    console.print(table)
    console.print(
        f"dropped: {stats.duplicates} duplicates, {stats.over_cap} over --max-instances, "
        f"{stats.empty_output} with empty output"
    )
    console.print(f"[green]wrote {result.rows} rows[/] to {result.path} (sha256 {result.sha256[:12]})")


def finetune(
    rounds: RoundsOption = None,
    base_model: Annotated[
        str | None,
        typer.Option(help="Hub id, model folder or .gguf file (default: the embedded SmolLM2-135M)."),
    ] = None,
    max_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 200,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 8,
    include_seeds: Annotated[
        bool, typer.Option("--include-seeds", help="Also train on the seed tasks.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Build the data and manifest; do not train.")
    ] = False,
    store: StoreOption = None,
) -> None:
    """Fine-tune a LoRA adapter on committed rounds (the `finetune` flow); prints its losses."""
    from pydantic import ValidationError

    from schemas.training import FinetuneParams

    settings = load_settings(store)
    store_obj = open_store(settings)
    chosen = _rounds_or_fail(store_obj, rounds)
    try:
        params = FinetuneParams(
            store_url=settings.store_url,
            rounds=chosen,
            include_seeds=include_seeds,
            base_model=base_model,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            dry_run=dry_run,
        )
    except ValidationError as error:
        first = error.errors()[0]
        fail(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}")
        raise
    prepare_prefect_env(local_data_dir(settings))

    from flows.finetune import finetune as finetune_flow

    try:
        summary = finetune_flow(params)
    except Exception as error:  # the flow already logged the traceback
        fail(f"fine-tune failed: {error}", code=1)
        raise
    table = Table(title=f"Fine-tune {summary['finetune_id']}" + (" (dry run)" if dry_run else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: Any = summary["rows"]
    table.add_row("rounds", ", ".join(map(str, chosen)))
    table.add_row("train / validation rows", f"{rows['train']} / {rows['validation']}")
    for key in ("eval_loss_before", "eval_loss_after"):
        value = summary[key]
        table.add_row(key.replace("_", " "), "-" if value is None else f"{value:.4f}")
    console.print(table)
    console.print(f"stored at {store_obj.location_of('finetunes/' + str(summary['finetune_id']))}")


def evaluate(
    finetune_id: Annotated[
        str | None, typer.Option(help="Fine-tune to evaluate (default: the newest trained one).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N held-out tasks.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Greedy decoding length per answer.")] = 64,
    heldout: Annotated[
        Path | None, typer.Option(help="Held-out tasks JSONL (default: the shipped file).")
    ] = None,
    judge: Annotated[
        bool, typer.Option("--judge/--no-judge", help="Rate every answer A-D with an LLM judge.")
    ] = True,
    judge_url: Annotated[
        list[str] | None,
        typer.Option(
            help="Judge's OpenAI-compatible base URL (repeatable; default: SELFINSTRUCT_LLM_URL or the "
            "embedded server)."
        ),
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option(help="Judge model name (default: SELFINSTRUCT_MODEL).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the bootstrap intervals.")] = 0,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Instead: fine-tune on the seeds only and on seeds + rounds with the same knobs, and "
            "compare both on the held-out tasks (the `compare` flow).",
        ),
    ] = False,
    rounds: RoundsOption = None,
    base_model: Annotated[
        str | None, typer.Option(help="With --compare: base model of both fine-tunes.")
    ] = None,
    max_steps: Annotated[int, typer.Option(min=1, help="With --compare: optimizer steps of each.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="With --compare: examples per step.")] = 8,
    store: StoreOption = None,
) -> None:
    """Compare a fine-tune with its base model on held-out tasks: ROUGE-L F and judged A-D ratings, with
    95% bootstrap intervals over tasks (the `evaluate` flow). With --compare, the seeds-only ablation."""
    from schemas.training import EvaluateParams
    from selfinstruct.cli import check_llm_servers
    from tasks.evaluate import load_heldout
    from tasks.seeds import SeedFileError

    settings = load_settings(store)
    store_obj = open_store(settings)
    if compare and finetune_id is not None:
        fail("--compare trains its own two fine-tunes: drop --finetune-id")
    chosen = _rounds_or_fail(store_obj, rounds) if compare else []
    if not compare:
        finetune_id = _finetune_or_fail(store_obj, finetune_id)
    if heldout is not None and not heldout.is_file():
        fail(f"{heldout}: no such file")
    try:
        load_heldout(heldout)
    except SeedFileError as error:
        fail(str(error))
    urls = [u.rstrip("/") for u in judge_url or []] or settings.llm_urls()
    if judge and urls:  # an embedded judge is started by the flow itself
        check_llm_servers(urls, judge_model or settings.model, settings)
    params = EvaluateParams(
        store_url=settings.store_url,
        finetune_id=finetune_id,
        limit=limit,
        max_new_tokens=max_new_tokens,
        heldout_path=str(heldout) if heldout else None,
        judge=judge,
        judge_urls=urls,
        judge_model=judge_model,
        bootstrap_seed=seed,
    )
    prepare_prefect_env(local_data_dir(settings))
    if compare:
        from schemas.training import CompareParams, FinetuneParams

        knobs = FinetuneParams(
            rounds=chosen, base_model=base_model, max_steps=max_steps, batch_size=batch_size
        )
        _run_compare(CompareParams(store_url=settings.store_url, finetune=knobs, evaluate=params))
        return

    from flows.evaluate import evaluate as evaluate_flow
    from schemas.training import AnswerScores
    from tasks.evaluate import score_columns

    try:
        summary = evaluate_flow(params)
    except Exception as error:  # the flow already logged the traceback
        fail(f"evaluation failed: {error}", code=1)
        raise
    table = Table(title=f"Held-out evaluation of {finetune_id} (95% bootstrap intervals over tasks)")
    columns = ("model", "ROUGE-L F", "judged A or B", "A/B/C/D/unparseable", "empty", "degenerate", "tasks")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for label in ("base", "finetuned"):
        scores = AnswerScores.model_validate(summary[label])
        cells = score_columns(scores)
        table.add_row(
            label,
            str(cells["rouge_l_f [95% CI]"]),
            str(cells["judged A or B [95% CI]"]),
            str(cells["ratings A/B/C/D/unparseable"]),
            f"{scores.empty_share:.1%}",
            f"{scores.degenerate_share:.1%}",
            str(scores.tasks),
        )
    console.print(table)
    if judge:
        console.print(
            f"judge: {summary.get('judge_model')} (A valid and satisfying, B minor imperfections, "
            "C significant errors, D irrelevant or invalid)"
        )
    console.print(f"result: {summary['location']}")


def _finetune_or_fail(store_obj: Any, finetune_id: str | None) -> str:
    """The fine-tune to evaluate (the newest trained one by default), or a one-line error."""
    from tasks.finetune import FinetuneError, latest_finetune, read_finetune_manifest

    try:
        if finetune_id is None:
            finetune_id = latest_finetune(store_obj)
            if finetune_id is None:
                fail(f"no trained fine-tune in store {_where(store_obj)}; run `selfinstruct finetune` first")
        elif read_finetune_manifest(store_obj, finetune_id).dry_run:
            fail(f"fine-tune {finetune_id} is a dry run: it has no adapter to evaluate")
    except FinetuneError as error:
        fail(str(error))
    assert finetune_id is not None
    return finetune_id


def _run_compare(params: Any) -> None:
    """Run the `compare` flow and print its table."""
    from flows.compare import compare as compare_flow
    from schemas.training import ComparisonResult

    try:
        summary = compare_flow(params)
    except Exception as error:  # the flow already logged the traceback
        fail(f"comparison failed: {error}", code=1)
        raise
    result = ComparisonResult.model_validate(summary["result"])
    print_comparison(result)
    console.print(
        f"comparison: {summary['comparison_id']} (finetunes {', '.join(result.finetunes.values())})"
    )


def print_comparison(result: Any) -> None:
    """The comparison table of a ComparisonResult."""
    from tasks.compare import comparison_rows

    rows = comparison_rows(result)
    table = Table(
        title=f"Seeds only vs seeds + rounds on {result.seeds_only.tasks} held-out tasks "
        "(same base, steps, seed, batch; 95% bootstrap intervals over tasks)"
    )
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the `export`, `finetune` and `evaluate` commands to the top-level app."""
    app.command(name="export")(export)
    app.command(name="finetune")(finetune)
    app.command(name="evaluate")(evaluate)
