"""The `selfinstruct` command line: `run`, `status`, `verify`, and every other command registered on `app`.

Every command is on `app` as soon as this module is imported. Prefect, the store and the training stack are
imported inside the commands, after Prefect's environment is set up, so `selfinstruct --help` stays fast.
"""

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from schemas import Settings
from schemas.settings import LLMApi
from selfinstruct import cli_audit, cli_export, cli_ops, cli_train, processes
from selfinstruct.cli_llm import llm_app
from selfinstruct.console import console, errors, fail
from selfinstruct.inputs import (
    check_store_writable,
    configure_prefect_from_argv,
    load_config,
    load_settings,
    local_data_dir,
    open_store_or_fail,
    prepare_prefect_env,
)

app = typer.Typer(
    help="Self-Instruct bootstrap rounds on Prefect.", no_args_is_help=True, add_completion=False
)


def check_llm_servers(
    urls: list[str], model: str, settings: Settings, stop: tuple[str, ...] = ()
) -> int | None:
    """Fail before anything is written when an LLM URL is malformed, its server is down, does not answer
    like an OpenAI-compatible server, refuses the request or lacks the model (see
    `OpenAICompletionClient.preflight`; the check carries `stop`).

    Returns:
        The smallest context window the servers report, or None (also when `urls` is empty: the embedded
        server is started by the run itself, after this check).
    """
    if not urls:
        return None
    import asyncio
    from urllib.parse import urlsplit

    from tasks.resources.llm.client import OpenAICompletionClient, check_base_url
    from tasks.resources.llm.protocol import LLMError
    from tasks.resources.redact import redact_url

    try:
        for url in urls:
            check_base_url(url)
    except LLMError as error:
        fail(str(error))
    for url in urls:
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            # The URLs become Prefect flow parameters, which are stored and shown in the UI.
            fail(
                f"LLM URL {redact_url(url)}: put the API key in SELFINSTRUCT_API_KEY, not in the URL "
                "(no user info, query string or fragment)"
            )

    async def preflight() -> int | None:
        client = OpenAICompletionClient(
            urls,
            model,
            api_key=settings.api_key,
            timeout_s=min(settings.llm_timeout_s, 30.0),
            max_retries=0,
            api=settings.llm_api,
        )
        try:
            return await client.preflight(stop)
        finally:
            await client.aclose()

    try:
        return asyncio.run(preflight())
    except LLMError as error:
        fail(str(error))


def instruction_budget(window: int, config: Any) -> int:
    """Most tokens a seed instruction may have to fit a prompt in a context of `window` tokens, with room
    for the instruction-generation completion."""
    return max(1, window - min(config.instruction_sampling.max_tokens, window // 2))


@app.command()
def run(
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Bootstrap rounds to run.")] = 1,
    seeds: Annotated[Path | None, typer.Option(help="Seed tasks JSONL (Self-Instruct schema).")] = None,
    store: Annotated[str | None, typer.Option(help="Store root URL (folder or s3://bucket/prefix).")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of BootstrapConfig fields.")] = None,
    prompts: Annotated[
        int | None, typer.Option(min=1, help="Instruction-generation prompts per round.")
    ] = None,
    llm_url: Annotated[
        list[str] | None, typer.Option(help="OpenAI-compatible base URL (repeatable).")
    ] = None,
    llm_api: Annotated[
        LLMApi | None,
        typer.Option(
            help="Send prompts to /v1/completions or, one prompt per request, to /v1/chat/completions "
            "(default: SELFINSTRUCT_LLM_API, else completions)."
        ),
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            help="Generate with the LoRA adapter a fine-tune registered on the vLLM server: its id, or "
            "'latest'."
        ),
    ] = None,
    store_slot: Annotated[
        bool | None,
        typer.Option(
            "--store-slot/--no-store-slot",
            help="Queue behind other runs on this store with a Prefect global concurrency slot (default: on "
            "with a Prefect server, off in ephemeral mode, where no server frees a dead run's slot).",
        ),
    ] = None,
) -> None:
    """Run bootstrap rounds and print what each one kept and rejected."""
    from tasks.round.seeds import SeedFileError, load_seeds

    settings = load_settings(store)
    if llm_api is not None:
        settings = settings.model_copy(update={"llm_api": llm_api})
    round_config = load_config(config, prompts, adapter)
    try:
        load_seeds(seeds)
    except SeedFileError as error:
        fail(str(error))
    sampling = (
        round_config.instruction_sampling,
        round_config.classify_sampling,
        round_config.instance_sampling,
    )
    store_obj = open_store_or_fail(settings, must_exist=False)
    check_store_writable(settings)
    window = check_llm_servers(
        [u.rstrip("/") for u in llm_url or []] or settings.llm_urls(),
        # "latest" is resolved from the store when the round opens; the base model is checked here.
        round_config.adapter
        if round_config.adapter not in (None, "latest")
        else round_config.model or settings.model,
        settings,
        max((s.stop for s in sampling), key=len),
    )
    if window:
        try:
            load_seeds(seeds, max_instruction_tokens=instruction_budget(window, round_config))
        except SeedFileError as error:
            fail(str(error))
    prepare_prefect_env(local_data_dir(settings))
    processes.guard_child_processes()

    from flows.bootstrap import bootstrap_round
    from schemas import RoundParams
    from selfinstruct.progress import terminal_progress
    from tasks.publish.progress import ProgressUpdate, report
    from tasks.resources.redact import redact_url
    from tasks.resources.servers.endpoints import llm_endpoints

    summaries = []
    with llm_endpoints(list(llm_url or []), settings) as urls, terminal_progress(console):
        console.print(f"LLM server(s): {', '.join(redact_url(u) for u in urls)}")
        report(ProgressUpdate("run", done=0, total=rounds, unit="rounds"))
        for _ in range(rounds):
            params = RoundParams(
                store_url=settings.store_url,
                seeds_path=str(seeds) if seeds else None,
                llm_urls=urls,
                llm_api=settings.llm_api,
                config=round_config,
                store_slot=bool(os.environ.get("PREFECT_API_URL")) if store_slot is None else store_slot,
            )
            try:
                summary = bootstrap_round(params)
            except Exception as error:  # the flow already logged the traceback
                fail(f"round failed: {error}", code=1)
            summaries.append(summary)
            console.print(f"[green]round {summary['round']} committed[/] at {summary['location']}")
            counts: list[Any] = [s["counts"] for s in summaries]
            kept = sum(c["kept"] for c in counts)
            instances = sum(c["instances"] for c in counts)
            report(
                ProgressUpdate(
                    "run",
                    done=len(summaries),
                    note=f"kept so far: {kept} instructions, {instances} instances",
                )
            )
    print_summary(store_obj, summaries)


def print_summary(store_obj: Any, summaries: list[dict[str, Any]]) -> None:
    """Kept and rejected per reason for each round run, pool size and file locations."""
    table = Table(title="Bootstrap rounds")
    table.add_column("round", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("instances", justify="right")
    table.add_column("rejected (reason: count)")
    for summary in summaries:
        counts = summary["counts"]
        rejected = ", ".join(
            f"{k.removeprefix('rejected:')}: {v}" for k, v in counts.items() if k.startswith("rejected:")
        )
        table.add_row(str(summary["round"]), str(counts["kept"]), str(counts["instances"]), rejected or "-")
    console.print(table)
    rounds = store_obj.committed_rounds()
    pool = sum(store_obj.read_manifest(n).counts["kept"] for n in rounds)
    console.print(
        f"pool: {pool} machine-generated instructions in {len(rounds)} committed rounds (plus seeds)"
    )
    for summary in summaries:
        console.print(f"  round {summary['round']}: {summary['location']}/*.parquet")


@app.command()
def status(store: Annotated[str | None, typer.Option(help="Store root URL.")] = None) -> None:
    """List the committed rounds of a store."""
    from tasks.resources.store.files import StoreError

    settings = load_settings(store)
    store_obj = open_store_or_fail(settings)
    rounds = store_obj.committed_rounds()
    try:
        manifests = [store_obj.read_manifest(number) for number in rounds]
    except StoreError as error:
        fail(f"{error}; run `selfinstruct verify`")
    table = Table(title=f"Committed rounds in {store_obj.location(1).rsplit('/rounds/', 1)[0]}")
    columns = ("round", "committed at", "model", "kept", "classification", "instances", "rejected")
    for column in (*columns, "server busy"):
        table.add_column(column)
    for number, manifest in zip(rounds, manifests, strict=True):
        counts = manifest.counts
        rejected = sum(v for k, v in counts.items() if k.startswith("rejected:"))
        table.add_row(
            str(number),
            manifest.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            manifest.model,
            str(counts.get("kept", 0)),
            str(counts.get("classification", 0)),
            str(counts.get("instances", 0)),
            str(rejected),
            "-" if manifest.load is None else f"{manifest.load.busy_fraction:.0%}",
        )
    console.print(table)
    if not rounds:
        console.print("no committed rounds")
    pending = store_obj.uncommitted_rounds()
    if pending:
        console.print(f"[yellow]uncommitted (ignored) round folders:[/] {', '.join(map(str, pending))}")


@app.command()
def verify(
    store: Annotated[str | None, typer.Option(help="Store root URL.")] = None,
    seeds: Annotated[Path | None, typer.Option(help="Seed tasks JSONL the pool starts from.")] = None,
    clean: Annotated[
        bool,
        typer.Option(
            "--clean",
            help="Move uncommitted rounds after the last committed one, whose claim has expired, to "
            "quarantine/ in the store (nothing is deleted; a gap between committed rounds is never touched).",
        ),
    ] = False,
) -> None:
    """Check committed rounds against their manifests and the pool for duplicates; exit 1 on problems."""
    from tasks.round.seeds import SeedFileError, load_seeds
    from tasks.round.verify import quarantine_dangling, verify_store

    settings = load_settings(store)
    store_obj = open_store_or_fail(settings)
    try:
        seed_tasks, _ = load_seeds(seeds)
    except SeedFileError as error:
        fail(str(error))
    report = verify_store(store_obj, seed_tasks)
    for problem in report.problems:
        errors.print(f"[red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if report.dangling:
        console.print(f"[yellow]uncommitted round folders:[/] {', '.join(map(str, report.dangling))}")
        if clean:
            moved = quarantine_dangling(store_obj, report.dangling)
            for number, where in moved:
                console.print(f"round {number} moved to {where}", highlight=False, soft_wrap=True)
            if not moved:
                console.print("nothing moved (claims still live)")
    console.print(
        f"{report.rounds_checked} committed rounds, {report.instructions} instructions checked: "
        + ("[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problems[/]")
    )
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def unlock(
    round_number: Annotated[int, typer.Option("--round", min=1, help="The uncommitted round to unlock.")],
    store: Annotated[str | None, typer.Option(help="Store root URL.")] = None,
) -> None:
    """Lift the claim of an uncommitted round whose holder is gone; refused while its lease is live."""
    from tasks.resources.store.files import StoreError

    settings = load_settings(store)
    store_obj = open_store_or_fail(settings)
    try:
        removed = store_obj.unlock(round_number)
    except StoreError as error:
        fail(str(error))
    console.print(f"round {round_number} unlocked (removed {', '.join(removed)}); the next run redoes it")


cli_ops.register(app)
cli_export.register(app)
cli_train.register(app)
cli_audit.register(app)
app.add_typer(llm_app, name="llm", help="Start an LLM server (vLLM or the embedded llama.cpp).")


def main() -> None:
    """Console-script entry point."""
    processes.as_program = True
    configure_prefect_from_argv(sys.argv[1:])
    try:
        app()
    except SystemExit:
        if processes.signalled is not None:  # click turned the KeyboardInterrupt into "Aborted!" and exit 1
            sys.exit(128 + processes.signalled)
        raise
