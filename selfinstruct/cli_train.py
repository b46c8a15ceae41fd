"""`selfinstruct finetune` and `evaluate`: LoRA fine-tunes and their held-out evaluation (or the ablation).

Prefect and the training stack are imported inside the commands, after the store and arguments are checked,
so a bad argument fails in well under a second.
"""

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from selfinstruct import processes
from selfinstruct.console import console, fail
from selfinstruct.inputs import (
    JudgeModelOption,
    JudgeUrlOption,
    RoundsOption,
    StoreOption,
    judge_urls,
    load_settings,
    local_data_dir,
    open_store_or_fail,
    prepare_prefect_env,
    rounds_or_fail,
)
from tasks.resources.redact import redact_url


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
    lora_r: Annotated[int, typer.Option(min=1, max=1024, help="LoRA rank.")] = 16,
    vllm_url: Annotated[
        str | None,
        typer.Option(help="vLLM server (…/v1) to register the adapter with, under the fine-tune id."),
    ] = None,
    vllm_adapter_path: Annotated[
        str | None,
        typer.Option(help="The adapter folder as the vLLM server sees it (default: a local copy)."),
    ] = None,
    vllm_max_lora_rank: Annotated[
        int, typer.Option(min=1, max=1024, help="The vLLM server's --max-lora-rank; checked before training.")
    ] = 16,
    store: StoreOption = None,
) -> None:
    """Fine-tune a LoRA adapter on committed rounds (the `finetune` flow); prints its losses."""
    from pydantic import ValidationError

    from schemas.training import FinetuneParams

    settings = load_settings(store)
    store_obj = open_store_or_fail(settings)
    chosen = rounds_or_fail(store_obj, rounds)
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
            lora_r=lora_r,
            vllm_url=vllm_url,
            vllm_adapter_path=vllm_adapter_path,
            vllm_max_lora_rank=vllm_max_lora_rank,
        )
    except ValidationError as error:
        first = error.errors()[0]
        if first["loc"]:
            fail(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}")
        fail(str(first["msg"]).removeprefix("Value error, "))
        raise
    prepare_prefect_env(local_data_dir(settings))
    processes.guard_child_processes()

    from flows.finetune import finetune as finetune_flow
    from selfinstruct.progress import terminal_progress

    try:
        with terminal_progress(console):
            summary = finetune_flow(params)
    except Exception as error:  # the flow already logged the traceback
        fail(f"fine-tune failed: {error}", code=1)
    table = Table(title=f"Fine-tune {summary['finetune_id']}" + (" (dry run)" if dry_run else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: Any = summary["rows"]
    table.add_row("rounds", ", ".join(map(str, chosen)))
    table.add_row("train / validation rows", f"{rows['train']} / {rows['validation']}")
    table.add_row("dataset fingerprint", str(summary.get("dataset_fingerprint") or "-")[:16])
    for key in ("eval_loss_before", "eval_loss_after"):
        value = summary[key]
        table.add_row(key.replace("_", " "), "-" if value is None else f"{value:.4f}")
    console.print(table)
    location = store_obj.location_of(f"finetunes/{summary['finetune_id']}")
    console.print(f"stored at {location}; trained on the dataset folder {location}/dataset")
    if vllm_url and not dry_run:
        console.print(
            f"registered on {redact_url(vllm_url)} as {summary['finetune_id']}: generate with it with "
            f"`selfinstruct run --adapter {summary['finetune_id']}` (or --adapter latest)",
            highlight=False,
            soft_wrap=True,
        )


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
    judge_url: JudgeUrlOption = None,
    judge_model: JudgeModelOption = None,
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
    from tasks.round.seeds import SeedFileError
    from tasks.training.answers import load_heldout

    settings = load_settings(store)
    store_obj = open_store_or_fail(settings)
    if compare and finetune_id is not None:
        fail("--compare trains its own two fine-tunes: drop --finetune-id")
    chosen = rounds_or_fail(store_obj, rounds) if compare else []
    if not compare:
        finetune_id = _finetune_or_fail(store_obj, finetune_id)
    if heldout is not None and not heldout.is_file():
        fail(f"{heldout}: no such file")
    try:
        load_heldout(heldout)
    except SeedFileError as error:
        fail(str(error))
    urls = judge_urls(judge_url, judge_model, settings) if judge else settings.llm_urls()
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
    processes.guard_child_processes()
    if compare:
        from schemas.training import CompareParams, FinetuneParams

        knobs = FinetuneParams(
            rounds=chosen, base_model=base_model, max_steps=max_steps, batch_size=batch_size
        )
        _run_compare(CompareParams(store_url=settings.store_url, finetune=knobs, evaluate=params))
        return

    from flows.evaluate import evaluate as evaluate_flow
    from schemas.training import AnswerScores
    from selfinstruct.progress import terminal_progress
    from tasks.training.evaluate import score_columns

    try:
        with terminal_progress(console):
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
    from tasks.training.models import FinetuneError
    from tasks.training.registry import finetune_to_evaluate

    try:
        found = finetune_to_evaluate(store_obj, finetune_id)
    except FinetuneError as error:
        fail(str(error))
    if found is None:
        fail(f"no trained fine-tune in store {redact_url(store_obj.url)}; run `selfinstruct finetune` first")
    return found


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
    from tasks.training.compare import comparison_rows

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
    """Add the `finetune` and `evaluate` commands to the top-level app."""
    app.command(name="finetune")(finetune)
    app.command(name="evaluate")(evaluate)
