"""The `selfinstruct` command line. Prefect is imported lazily, after its environment is set up."""

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from schemas import BootstrapConfig, Settings

app = typer.Typer(
    help="Self-Instruct bootstrap rounds on Prefect.", no_args_is_help=True, add_completion=False
)
console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    errors.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def local_data_dir(settings: Settings) -> Path:
    """Folder for local state (Prefect's database, model files): the store when local, else ./data."""
    if "://" in settings.store_url and not settings.store_url.startswith("file://"):
        return Path("data").resolve()
    return Path(settings.store_url.removeprefix("file://")).expanduser().resolve()


def prepare_prefect_env(data_dir: Path) -> None:
    """Keep Prefect's ephemeral API inside the project's data folder, and give it time to start on 2 cores."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(data_dir / "prefect"))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def load_settings(store: str | None) -> Settings:
    """Settings from the environment, with the store overridden by --store."""
    try:
        settings = Settings()
        if store:
            settings = settings.model_copy(update={"store_url": store})
    except ValidationError as error:
        first = error.errors()[0]
        fail(f"settings: SELFINSTRUCT_{str(first['loc'][0]).upper()}: {first['msg']}")
        raise
    return settings


def load_config(path: Path | None, prompts: int | None) -> BootstrapConfig:
    """A BootstrapConfig from a JSON file (all fields optional), with --prompts applied."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            fail(f"{path}: cannot read ({error.strerror})")
        except json.JSONDecodeError as error:
            fail(f"{path}:{error.lineno}: invalid JSON ({error.msg})")
        if not isinstance(data, dict):
            fail(f"{path}: expected a JSON object of BootstrapConfig fields")
    if prompts is not None:
        data["prompts_per_round"] = prompts
    try:
        return BootstrapConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(f"{path or 'config'}: field '{where}': {first['msg']}")
        raise


def open_store(settings: Settings) -> Any:
    """The configured store, or a clear error."""
    from tasks.store import Store, StoreError, redact_url

    try:
        store_obj = Store(settings.store_url, settings)
    except StoreError as error:
        fail(str(error))
    try:
        # One cheap read, so missing or wrong S3 credentials, an unreachable endpoint or a store path that is
        # a file show up as one line here instead of a traceback from inside a flow.
        store_obj.committed_rounds()
    except Exception as error:
        fail(f"store {redact_url(settings.store_url)}: cannot read it ({type(error).__name__}: {error})")
    return store_obj


def check_llm_servers(urls: list[str], model: str, settings: Settings) -> None:
    """Fail before anything is written when an LLM server is down, refuses the request or lacks the model.

    Transient answers (5xx, 429, a timeout) pass: the round's retries deal with those.
    """
    import asyncio
    from urllib.parse import urlsplit

    import httpx

    from tasks.llm import LLMError
    from tasks.store import redact_url

    for url in urls:
        shown = redact_url(url)
        parts = urlsplit(url)
        if parts.username or parts.password:
            # The URLs become Prefect flow parameters, which are stored and shown in the UI.
            fail(f"LLM URL {shown}: put the API key in SELFINSTRUCT_API_KEY, not in the URL")
        try:
            httpx.get(f"{url}/models", timeout=10.0)
        except httpx.TransportError as error:
            fail(f"LLM server {shown} is unreachable ({type(error).__name__})")
        try:
            asyncio.run(_complete_one_token(url, model, settings))
        except LLMError as error:
            if not error.retryable:  # a 4xx: unknown model, bad API key, a request the server refuses
                fail(f"LLM server check failed: {error}")


async def _complete_one_token(url: str, model: str, settings: Settings) -> None:
    from schemas import SamplingParams
    from tasks.llm import OpenAICompletionClient

    client = OpenAICompletionClient(
        [url], model, api_key=settings.api_key, timeout_s=min(settings.llm_timeout_s, 30.0), max_retries=0
    )
    try:
        await client.complete(["Say OK."], SamplingParams(max_tokens=1), None, "instruction")
    finally:
        await client.aclose()


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
    from tasks.seeds import SeedFileError, load_seeds

    settings = load_settings(store)
    round_config = load_config(config, prompts)
    try:
        load_seeds(seeds)
    except SeedFileError as error:
        fail(str(error))
    check_llm_servers(
        [u.rstrip("/") for u in llm_url or []] or settings.llm_urls(),
        round_config.model or settings.model,
        settings,
    )
    store_obj = open_store(settings)
    prepare_prefect_env(local_data_dir(settings))

    from flows.bootstrap import bootstrap_round
    from schemas import RoundParams
    from tasks.steps import llm_endpoints
    from tasks.store import redact_url

    summaries = []
    with llm_endpoints(list(llm_url or []), settings) as urls:
        console.print(f"LLM server(s): {', '.join(redact_url(u) for u in urls)}")
        for _ in range(rounds):
            params = RoundParams(
                store_url=settings.store_url,
                seeds_path=str(seeds) if seeds else None,
                llm_urls=urls,
                config=round_config,
                store_slot=bool(os.environ.get("PREFECT_API_URL")) if store_slot is None else store_slot,
            )
            try:
                summary = bootstrap_round(params)
            except Exception as error:  # the flow already logged the traceback
                fail(f"round failed: {error}", code=1)
            summaries.append(summary)
            console.print(f"[green]round {summary['round']} committed[/] at {summary['location']}")
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
    settings = load_settings(store)
    store_obj = open_store(settings)
    rounds = store_obj.committed_rounds()
    table = Table(title=f"Committed rounds in {store_obj.location(1).rsplit('/rounds/', 1)[0]}")
    for column in ("round", "committed at", "model", "kept", "classification", "instances", "rejected"):
        table.add_column(column)
    for number in rounds:
        manifest = store_obj.read_manifest(number)
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
    clean: Annotated[bool, typer.Option("--clean", help="Remove dangling uncommitted rounds.")] = False,
) -> None:
    """Check committed rounds against their manifests and the pool for duplicates; exit 1 on problems."""
    from tasks.seeds import SeedFileError, load_seeds
    from tasks.verify import clean_dangling, verify_store

    settings = load_settings(store)
    store_obj = open_store(settings)
    try:
        seed_tasks, _ = load_seeds(seeds)
    except SeedFileError as error:
        fail(str(error))
    report = verify_store(store_obj, seed_tasks)
    for problem in report.problems:
        errors.print(f"[red]problem:[/] {problem}", highlight=False)
    if report.dangling:
        console.print(f"[yellow]uncommitted round folders:[/] {', '.join(map(str, report.dangling))}")
        if clean:
            removed = clean_dangling(store_obj, report.dangling)
            console.print(f"removed: {', '.join(map(str, removed)) or 'none (claims still live)'}")
    console.print(
        f"{report.rounds_checked} committed rounds, {report.instructions} instructions checked: "
        + ("[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problems[/]")
    )
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    from selfinstruct import cli_audit, cli_ops, cli_train
    from selfinstruct.cli_llm import llm_app

    cli_ops.register(app)
    cli_train.register(app)
    cli_audit.register(app)
    app.add_typer(llm_app, name="llm", help="Start an LLM server (vLLM or the embedded llama.cpp).")
    app()
