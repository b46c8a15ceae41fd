"""Operations commands: `selfinstruct stack up|down|status` (the local Prefect stack) and `report`.

The stack itself (processes, deployments, automations) lives in deployments/ (stack.py starts and stops it);
these commands parse flags, call it and print.
"""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from deployments.processes import StackError, is_running
from deployments.stack import health, start_stack, stop_stack
from deployments.state import (
    DEFAULT_LLM_PORT,
    DEFAULT_POOL,
    DEFAULT_PORT,
    DEFAULT_REPORT_PORT,
    PREFECT_FILE,
    StackLayout,
    StackOptions,
    read_state,
)
from selfinstruct.console import console, fail

# -- command line ------------------------------------------------------------------------------------

stack_app = typer.Typer(
    help="The local stack: Prefect server, work pool, deployments, worker and LLM server on 127.0.0.1.",
    no_args_is_help=True,
    add_completion=False,
)


def _layout(data_dir: Path) -> StackLayout:
    return StackLayout(root=Path.cwd().resolve(), data_dir=data_dir.expanduser().resolve())


DataDirOption = Annotated[Path, typer.Option(help="Folder for the stack's Prefect home, state and logs.")]


# The "run a round now" hint: a round small enough to finish in a few minutes on the embedded CPU model.
SMALL_ROUND = '{"config": {"prompts_per_round": 8}}'


def _round_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from schemas import BootstrapConfig

    try:
        data = json.loads(path.read_text())
        BootstrapConfig.model_validate(data)
    except (OSError, ValueError) as error:
        fail(f"{path}: not a JSON object of BootstrapConfig fields ({error})", code=2)
    return dict(data)


@stack_app.command("up")
def stack_up(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Prefect API and UI port.")] = DEFAULT_PORT,
    llm_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Embedded LLM server port.")
    ] = DEFAULT_LLM_PORT,
    report_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of the report server the UI links to.")
    ] = DEFAULT_REPORT_PORT,
    llm_url: Annotated[
        str | None, typer.Option(help="Use this OpenAI-compatible base URL instead of the embedded server.")
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="Store of the deployed runs (default: the data folder).")
    ] = None,
    pool: Annotated[str, typer.Option(help="Process work pool to create and serve.")] = DEFAULT_POOL,
    prefect_file: Annotated[Path, typer.Option(help="Deployments file, relative to the repository root.")] = (
        PREFECT_FILE
    ),
    dry_run_finetunes: Annotated[
        bool,
        typer.Option("--dry-run-finetunes", help="Deploy the data.ready trigger with dry_run=true (no GPU)."),
    ] = False,
    every: Annotated[
        int | None,
        typer.Option(min=60, help="Run a round every this many seconds instead of nightly (to try it out)."),
    ] = None,
    round_config: Annotated[
        Path | None, typer.Option(help="JSON file of BootstrapConfig fields for the deployed rounds.")
    ] = None,
    data_ready_threshold: Annotated[
        int | None, typer.Option(min=0, help="Instances that trigger a fine-tune (0: never).")
    ] = None,
    data_dir: DataDirOption = Path("data"),
) -> None:
    """Start the server, deploy, start a worker, the LLM and report servers; print the UI URL."""
    layout = _layout(data_dir)
    options = StackOptions(
        port=port,
        llm_port=llm_port,
        report_port=report_port,
        llm_url=llm_url,
        store_url=store,
        pool=pool,
        prefect_file=prefect_file,
        dry_run_finetunes=dry_run_finetunes,
        every_s=every,
        round_config=_round_config(round_config),
        data_ready_threshold=data_ready_threshold,
    )
    try:
        with console.status("bringing the stack up...") as status:
            state = start_stack(layout, options, say=lambda message: status.update(message))
    except StackError as error:
        fail(str(error), code=1)
    table = Table(title="selfinstruct stack", show_header=False)
    table.add_row("UI", f"[bold green]{state.ui_url}[/]")
    table.add_row("API", f"export PREFECT_API_URL={state.api_url}")
    table.add_row("LLM", state.llm_url or "-")
    table.add_row("store", state.store_url)
    table.add_row("reports", state.report_url or "-")
    table.add_row("work pool", state.pool)
    table.add_row("schedule", f"a round every {every} s" if every else "nightly (prefect.yaml)")
    for managed in state.processes:
        table.add_row(managed.name, f"pid {managed.pid}, log {managed.log}")
    console.print(table)
    if dry_run_finetunes:
        console.print(
            "Fine-tunes started by selfinstruct.data.ready are DRY RUNS (data and manifest, no training). "
            "A dry run does not consume the data, so while the new data stays above the threshold each "
            "later round announces it again.",
            highlight=False,
        )
    console.print(
        f"Run a small round now: PREFECT_API_URL={state.api_url} prefect deployment run "
        f"'bootstrap-round/bootstrap-nightly' --param 'params={SMALL_ROUND}'",
        highlight=False,
        soft_wrap=True,
    )
    console.print("Stop everything: selfinstruct stack down", style="dim")


@stack_app.command("down")
def stack_down(data_dir: DataDirOption = Path("data")) -> None:
    """Cancel the flow runs in flight, then stop exactly the processes `stack up` started."""
    layout = _layout(data_dir)
    try:
        outcomes = stop_stack(layout, say=lambda message: console.print(message, style="dim"))
    except StackError as error:
        fail(str(error), code=1)
    if not outcomes:
        console.print(f"no stack recorded in {layout.state_file}; nothing to stop")
        return
    for name, pid, outcome in outcomes:
        console.print(
            f"{name} (pid {pid}): {'already gone' if outcome == 'not running' else 'stopped by ' + outcome}"
        )
    console.print("[green]stack down[/]")


@stack_app.command("status")
def stack_status(data_dir: DataDirOption = Path("data")) -> None:
    """Show the recorded processes and whether the API and LLM server answer; exit 1 if anything is down."""
    layout = _layout(data_dir)
    try:
        state = read_state(layout)
    except StackError as error:
        fail(str(error), code=1)
    if state is None:
        console.print(f"no stack recorded in {layout.state_file}")
        raise typer.Exit(1)
    table = Table(title=f"selfinstruct stack (UI {state.ui_url})")
    for column in ("component", "pid", "state", "log"):
        table.add_column(column)
    running = {p.name: is_running(p) for p in state.processes}
    for managed in state.processes:
        label = "[green]running[/]" if running[managed.name] else "[red]gone[/]"
        table.add_row(managed.name, str(managed.pid), label, managed.log)
    checks = health(state)
    for name, ok in checks.items():
        table.add_row(f"{name} health", "", "[green]answers[/]" if ok else "[red]no answer[/]", "")
    console.print(table)
    if not all(running.values()) or not all(checks.values()):
        raise typer.Exit(1)


def report(
    round_: Annotated[
        int | None, typer.Option("--round", min=1, help="Committed round; default the newest.")
    ] = None,
    store: Annotated[str | None, typer.Option(help="Store root URL (folder or s3://bucket/prefix).")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the HTML here.")] = None,
) -> None:
    """Write a round's HTML report (pool growth, ROUGE-L, lengths, rejections, verbs) into the store."""
    from selfinstruct.inputs import load_settings, open_store_or_fail
    from tasks.publish.report import render_report, save_report
    from tasks.resources.store.files import StoreError

    store_obj = open_store_or_fail(load_settings(store))
    try:
        with console.status("rendering the report..."):
            number, page = render_report(store_obj, round_)
            location = save_report(store_obj, number, page)
    except StoreError as error:
        fail(str(error), code=2)
    console.print(f"[green]round {number} report[/] written to {location}", highlight=False)
    if out is not None:
        try:
            out.write_text(page)
        except OSError as error:
            fail(f"{out}: cannot write ({error.strerror})", code=2)
        console.print(f"and to {out}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `stack` and `report` to the selfinstruct command line."""
    app.add_typer(stack_app, name="stack")
    app.command("report")(report)


def _main() -> None:
    """`python -m selfinstruct.cli_ops ...`: these commands alone (for tests and before they are wired)."""
    app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(app)
    app()


if __name__ == "__main__":
    _main()
