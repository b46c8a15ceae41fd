"""`selfinstruct export`, `finetune` and `evaluate`: training data, LoRA fine-tunes and held-out evaluation.

Prefect and the training stack are imported inside the commands, after the store and arguments are checked,
so a bad argument fails in well under a second.
"""

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from schemas.training import ExportFormat
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

StoreOption = Annotated[str | None, typer.Option(help="Store root URL (folder or s3://bucket/prefix).")]
RoundsOption = Annotated[
    str | None, typer.Option(help="Committed rounds, inclusive: N, A:B, :B or A: (default: all).")
]


class Format(StrEnum):
    """Export formats."""

    jsonl = "jsonl"
    alpaca = "alpaca"
    sft = "sft"
    messages = "messages"
    hf = "hf"


def _where(store_obj: Any) -> str:
    """A store's root for messages, credentials removed."""
    from tasks.resources.redact import redact_url

    return redact_url(store_obj.url)


def _rounds_or_fail(store_obj: Any, spec: str | None) -> list[int]:
    """The committed rounds `spec` names, their files checked against the manifests' checksums, or a
    one-line error (a tampered round is never read)."""
    from tasks.resources.store.files import StoreError
    from tasks.training.export import ExportError, select_rounds

    try:
        chosen = select_rounds(spec, store_obj.committed_rounds())
        store_obj.check_checksums(chosen)
    except (ExportError, StoreError) as error:
        fail(f"{error} (store {_where(store_obj)})")
    return chosen


def export(
    out: Annotated[
        Path | None,
        typer.Argument(
            help="File to write: .jsonl (jsonl, sft, messages) or .json (alpaca); a folder for hf."
        ),
    ] = None,
    fmt: Annotated[
        Format | None,
        typer.Option("--format", help="Row format, or hf for a dataset folder (default: jsonl)."),
    ] = None,
    to: Annotated[
        Path | None, typer.Option("--to", help="Write a Hugging Face dataset folder here (= --format hf).")
    ] = None,
    rounds: RoundsOption = None,
    include_seeds: Annotated[
        bool, typer.Option("--include-seeds", help="Also export the seed tasks.")
    ] = False,
    seeds: Annotated[Path | None, typer.Option(help="Seed tasks JSONL (default: the shipped seeds).")] = None,
    max_instances: Annotated[
        int, typer.Option(min=1, max=100, help="Instances per instruction at most.")
    ] = 5,
    seed: Annotated[
        int, typer.Option(help="Seeds instance sampling, template choice, shuffling and the split.")
    ] = 42,
    system_prompt: Annotated[
        str | None, typer.Option(help="System turn of every conversation (--format messages).")
    ] = None,
    validation_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=0.9, help="Share of instructions in the validation split (hf; default 0.1)."
        ),
    ] = None,
    license_id: Annotated[
        str | None,
        typer.Option("--license", help="License in the card (hf; default: the seeds' license, or unknown)."),
    ] = None,
    push_to_hub: Annotated[
        str | None, typer.Option(help="Also upload the folder to this Hub dataset repository (hf).")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repository private.")] = False,
    store: StoreOption = None,
) -> None:
    """Write fine-tuning data from committed rounds: jsonl (with provenance), alpaca (one JSON array),
    sft (prompt/completion), messages (conversations for chat fine-tuning), or a Hugging Face dataset
    folder (Parquet splits and a dataset card) with --to DIR or --format hf."""
    from tasks.round.seeds import SeedFileError
    from tasks.training.export import ExportError, TemplateError, check_export_path, write_export

    target, chosen_format = _export_target(out, fmt, to)
    hf_only = {
        "--validation-fraction": validation_fraction is not None,
        "--license": license_id is not None,
        "--push-to-hub": push_to_hub is not None,
        "--private": private,
    }
    if chosen_format is not Format.hf:
        for flag, given in hf_only.items():
            if given:
                fail(f"{flag} only applies to a dataset folder (--to DIR or --format hf)")
    if system_prompt is not None and chosen_format is not Format.messages:
        fail("--system-prompt only applies to --format messages")
    try:
        # Before the store is opened: a wrong name costs nothing.
        if chosen_format is Format.hf:
            _check_folder_target(target)
        else:
            check_export_path(target, _row_format(chosen_format))
    except ExportError as error:
        fail(str(error))
    store_obj = open_store_or_fail(load_settings(store))
    if chosen_format is Format.hf:
        _export_folder(
            store_obj,
            target,
            _rounds_or_fail(store_obj, rounds),
            include_seeds,
            seeds,
            max_instances,
            seed,
            0.1 if validation_fraction is None else validation_fraction,
            license_id,
            push_to_hub,
            private,
        )
        return
    _rounds_or_fail(store_obj, rounds)
    try:
        result = write_export(
            store_obj,
            target,
            _row_format(chosen_format),
            rounds,
            include_seeds,
            seeds,
            max_instances,
            seed,
            system_prompt,
        )
    except (ExportError, SeedFileError, TemplateError) as error:
        fail(f"{error} (store {_where(store_obj)})" if isinstance(error, ExportError) else str(error))
        raise
    _print_sources(f"Export ({chosen_format.value})", result.stats)
    console.print(f"[green]wrote {result.rows} rows[/] to {result.path} (sha256 {result.sha256[:12]})")


def _row_format(fmt: Format) -> ExportFormat:
    """The export format of a file (every Format but hf)."""
    formats: dict[Format, ExportFormat] = {
        Format.jsonl: "jsonl",
        Format.alpaca: "alpaca",
        Format.sft: "sft",
        Format.messages: "messages",
    }
    return formats[fmt]


def _export_target(out: Path | None, fmt: Format | None, to: Path | None) -> tuple[Path, Format]:
    """Where an export goes and in which format, from OUT, --format and --to (or a one-line error)."""
    if to is not None:
        if out is not None:
            fail("give either OUT or --to DIR, not both")
        if fmt not in (None, Format.hf):
            fail(f"--to writes a dataset folder (--format hf), not --format {fmt}")
        return to, Format.hf
    if out is None:
        fail("give the file to write (OUT), or --to DIR for a dataset folder")
        raise AssertionError  # fail() exits
    return out, fmt or Format.jsonl


def _check_folder_target(folder: Path) -> None:
    from tasks.training.dataset import check_target
    from tasks.training.export import ExportError

    if folder.suffix.lower() in (".json", ".jsonl", ".parquet"):
        raise ExportError(
            f"{folder}: --format hf writes a folder; give a folder name, not a {folder.suffix} file"
        )
    check_target(folder)


def _export_folder(
    store_obj: Any,
    folder: Path,
    chosen: list[int],
    include_seeds: bool,
    seeds: Path | None,
    max_instances: int,
    seed: int,
    validation_fraction: float,
    license_id: str | None,
    push_to_hub: str | None,
    private: bool,
) -> None:
    """`export --to DIR`: the dataset folder, a summary, and the optional upload."""
    from tasks.round.seeds import SeedFileError
    from tasks.training.dataset import DatasetSpec, build_dataset_folder
    from tasks.training.dataset import push_to_hub as push
    from tasks.training.export import ExportError, TemplateError

    spec = DatasetSpec(
        rounds=chosen,
        include_seeds=include_seeds,
        seeds_path=seeds,
        max_instances=max_instances,
        seed=seed,
        validation_fraction=validation_fraction,
    )
    try:
        result = build_dataset_folder(store_obj, spec, folder, license_id)
    except (ExportError, SeedFileError, TemplateError) as error:
        fail(f"{error} (store {_where(store_obj)})" if isinstance(error, ExportError) else str(error))
        raise
    _print_sources("Export (dataset folder)", result.stats)
    splits = ", ".join(f"{name} {rows}" for name, rows in result.rows.items())
    console.print(f"[green]wrote {splits} rows[/] and a dataset card to {result.path}")
    console.print(
        f"data fingerprint {result.fingerprint[:16]}; "
        f"load it with datasets.load_dataset({str(result.path)!r})"
    )
    if push_to_hub:
        try:
            url = push(result.path, push_to_hub, private)
        except ImportError:
            fail("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub)", code=1)
        except Exception as error:  # network, auth, a repository we may not write to
            fail(f"upload to {push_to_hub} failed: {type(error).__name__}: {error}", code=1)
        console.print(f"uploaded to {url}")


def _print_sources(title: str, stats: Any) -> None:
    """Rows per source and what was dropped, for both kinds of export."""
    table = Table(title=title)
    table.add_column("source")
    table.add_column("rows", justify="right")
    for source, count in stats.rows_per_source.items():
        table.add_row("seeds" if source == "seeds" else f"round {source}", str(count))
    console.print(table)
    console.print(
        f"dropped: {stats.duplicates} duplicates, {stats.over_cap} over --max-instances, "
        f"{stats.empty_output} with empty output"
    )


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
        from tasks.resources.redact import redact_url

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
    from tasks.training.evaluate import load_heldout

    settings = load_settings(store)
    store_obj = open_store_or_fail(settings)
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
    from tasks.training.finetune import FinetuneError, latest_finetune, read_finetune_manifest

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
    """Add the `export`, `finetune` and `evaluate` commands to the top-level app."""
    app.command(name="export")(export)
    app.command(name="finetune")(finetune)
    app.command(name="evaluate")(evaluate)
