"""`selfinstruct export`: fine-tuning data from committed rounds, as a file of rows or a dataset folder.

The store and the training-data code are imported inside the command, after the arguments are checked, so a
bad argument fails in well under a second.
"""

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from schemas.training import ExportFormat
from selfinstruct.console import console, fail
from selfinstruct.inputs import RoundsOption, StoreOption, load_settings, open_store_or_fail, rounds_or_fail
from tasks.resources.redact import redact_url


class Format(StrEnum):
    """Export formats."""

    jsonl = "jsonl"
    alpaca = "alpaca"
    sft = "sft"
    messages = "messages"
    hf = "hf"


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
    from tasks.training.dataset import check_target
    from tasks.training.export import ExportError, check_export_path, write_export
    from tasks.training.templates import TemplateError

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
            check_target(target)
        else:
            check_export_path(target, _row_format(chosen_format))
    except ExportError as error:
        fail(str(error))
    store_obj = open_store_or_fail(load_settings(store))
    if chosen_format is Format.hf:
        _export_folder(
            store_obj,
            target,
            rounds_or_fail(store_obj, rounds),
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
    rounds_or_fail(store_obj, rounds)
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
        fail(f"{error} (store {redact_url(store_obj.url)})" if isinstance(error, ExportError) else str(error))
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
    from tasks.training.export import ExportError
    from tasks.training.templates import TemplateError

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
        fail(f"{error} (store {redact_url(store_obj.url)})" if isinstance(error, ExportError) else str(error))
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


def register(app: typer.Typer) -> None:
    """Add the `export` command to the top-level app."""
    app.command(name="export")(export)
