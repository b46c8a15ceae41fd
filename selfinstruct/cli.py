"""The `selfinstruct` command line. Prefect is imported lazily, after its environment is set up."""

import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas import BootstrapConfig, Settings

app = typer.Typer(
    help="Self-Instruct bootstrap rounds on Prefect.", no_args_is_help=True, add_completion=False
)
console = Console()
errors = Console(stderr=True)


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped, so that it prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    errors.print(f"[bold red]error:[/] {escape(one_line(message))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def local_data_dir(settings: Settings) -> Path:
    """Folder for local state (Prefect's database, model files): the store when local, else ./data."""
    if "://" in settings.store_url and not settings.store_url.startswith("file://"):
        return Path("data").resolve()
    return Path(settings.store_url.removeprefix("file://")).expanduser().resolve()


PREFECT_STARTUP_TIMEOUT_S = 300  # a first start with a new database took 15-50 s on 2 loaded cores


def configure_prefect(data_dir: Path) -> None:
    """Point Prefect at the store's data folder and give its ephemeral API time to start. Writes nothing.

    Prefect reads its settings once, when it is first imported, so every command calls this (through
    `load_settings`) before anything that imports Prefect. Values the user set in the environment win.
    """
    if "prefect" in sys.modules:  # too late to change anything for this process (in-process tests)
        return
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(data_dir / "prefect"))
        os.environ.setdefault(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(PREFECT_STARTUP_TIMEOUT_S)
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # Prefect tries to create its home when imported; for a store that does not exist yet that fails with
    # a warning, which is right: nothing is written until `prepare_prefect_env`, after every check.
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")


def prepare_prefect_env(data_dir: Path) -> None:
    """Create Prefect's home before a flow runs (after every check passed, so bad input writes nothing)."""
    configure_prefect(data_dir)
    if not os.environ.get("PREFECT_API_URL") and os.environ.get("PREFECT_HOME"):
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


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
    try:
        data_dir = local_data_dir(settings)
    except (OSError, ValueError) as error:
        fail(f"store URL {settings.store_url[:200]!r}: not a usable path ({error})")
        raise
    configure_prefect(data_dir)
    return settings


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: Path | None, prompts: int | None) -> BootstrapConfig:
    """A BootstrapConfig from a JSON file (all fields optional), with --prompts applied."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as error:
            fail(f"{path}: cannot read ({error.strerror})")
        if len(raw) > MAX_CONFIG_BYTES:
            fail(f"{path}: {len(raw)} bytes; a config file is at most {MAX_CONFIG_BYTES}")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            fail(f"{path}: not UTF-8 text")
        except json.JSONDecodeError as error:
            fail(f"{path}:{error.lineno}: invalid JSON ({error.msg})")
        except RecursionError:
            fail(f"{path}: JSON nested too deeply")
        if not isinstance(data, dict):
            fail(f"{path}: expected a JSON object of BootstrapConfig fields")
    if prompts is not None:
        data["prompts_per_round"] = prompts
    try:
        return BootstrapConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<config>"
        fail(f"{path or 'config'}: field '{where}': {first['msg'][:200]}")
        raise
    except RecursionError:
        fail(f"{path or 'config'}: nested too deeply")
        raise


def open_store(settings: Settings, *, must_exist: bool = True) -> Any:
    """The configured store, or a clear error.

    Args:
        settings: Where the store is.
        must_exist: Refuse a store that does not exist (a mistyped path, a missing bucket); `run` passes
            False, and a local store is then created on the first commit, below a folder that must exist.
    """
    from tasks.store import Store, StoreError, redact_url

    shown = redact_url(settings.store_url)
    try:
        store_obj = Store(settings.store_url, settings)
    except StoreError as error:
        fail(str(error))
    try:
        # One cheap read, so missing or wrong S3 credentials, an unreachable endpoint or a store path that is
        # a file show up as one line here instead of a traceback from inside a flow.
        store_obj.committed_rounds()
        problem = store_obj.existence_problem(must_exist)
    except Exception as error:
        fail(f"store {shown}: cannot read it ({type(error).__name__}: {str(error)[:200]})")
    if problem:
        fail(f"store {shown}: {problem}")
    return store_obj


def check_llm_servers(urls: list[str], model: str, settings: Settings) -> int | None:
    """Fail before anything is written when an LLM URL is malformed, its server is down, does not answer
    like an OpenAI-compatible server, refuses the request or lacks the model (see
    `OpenAICompletionClient.preflight`).

    Returns:
        The smallest context window the servers report, or None.
    """
    import asyncio

    from tasks.llm import LLMError, OpenAICompletionClient, check_base_url

    try:
        for url in urls:
            check_base_url(url)
    except LLMError as error:
        fail(str(error))

    async def preflight() -> int | None:
        client = OpenAICompletionClient(
            urls, model, api_key=settings.api_key, timeout_s=min(settings.llm_timeout_s, 30.0), max_retries=0
        )
        try:
            return await client.preflight()
        finally:
            await client.aclose()

    try:
        return asyncio.run(preflight())
    except LLMError as error:
        fail(str(error))
        raise


def instruction_budget(window: int, config: BootstrapConfig) -> int:
    """Most tokens a seed instruction may have to fit a prompt in a context of `window` tokens, with room
    for the instruction-generation completion."""
    return max(1, window - min(config.instruction_sampling.max_tokens, window // 2))


def check_store_writable(settings: Settings) -> None:
    """A local store folder (or the folder it will be created in) must be writable; checked, not written."""
    if "://" in settings.store_url and not settings.store_url.startswith("file://"):
        return  # an S3 bucket's permissions show on the first write, which only a committed round makes
    root = local_data_dir(settings)
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"store {settings.store_url}: {existing} is not writable")


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
    store_obj = open_store(settings, must_exist=False)
    check_store_writable(settings)
    window = check_llm_servers(
        [u.rstrip("/") for u in llm_url or []] or settings.llm_urls(),
        round_config.model or settings.model,
        settings,
    )
    if window:
        try:
            load_seeds(seeds, max_instruction_tokens=instruction_budget(window, round_config))
        except SeedFileError as error:
            fail(str(error))
    prepare_prefect_env(local_data_dir(settings))
    guard_child_processes()

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
    from tasks.store import StoreError

    settings = load_settings(store)
    store_obj = open_store(settings)
    rounds = store_obj.committed_rounds()
    try:
        manifests = [store_obj.read_manifest(number) for number in rounds]
    except StoreError as error:
        fail(f"{error}; run `selfinstruct verify`")
    table = Table(title=f"Committed rounds in {store_obj.location(1).rsplit('/rounds/', 1)[0]}")
    for column in ("round", "committed at", "model", "kept", "classification", "instances", "rejected"):
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
    from tasks.seeds import SeedFileError, load_seeds
    from tasks.verify import quarantine_dangling, verify_store

    settings = load_settings(store)
    store_obj = open_store(settings)
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
    from tasks.store import StoreError

    settings = load_settings(store)
    store_obj = open_store(settings)
    try:
        removed = store_obj.unlock(round_number)
    except StoreError as error:
        fail(str(error))
    console.print(f"round {round_number} unlocked (removed {', '.join(removed)}); the next run redoes it")


_as_program = False  # True when started as the `selfinstruct` program (not in-process, as in tests)
_signalled: int | None = None
CANCEL_GRACE_S = 5.0


def _cancel(signum: int, _frame: object) -> None:
    """SIGINT/SIGTERM: stop the round with a clear line; a hard exit after CANCEL_GRACE_S if it hangs.

    A Ctrl-C reaches the whole process group, so Prefect's ephemeral server may already be gone and the
    engine's last state report could retry for minutes: the timer bounds the wait.
    """
    global _signalled
    if _signalled is not None:  # a second signal: leave now
        os._exit(128 + signum)
    _signalled = signum
    name = signal.Signals(signum).name
    errors.print(
        f"[bold red]error:[/] {name}: cancelling; the round is not committed (a rerun resumes it)",
        soft_wrap=True,
        highlight=False,
    )
    timer = threading.Timer(CANCEL_GRACE_S, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    # Backstop that needs no Python thread to run (on a loaded machine the timer can be late): the kernel
    # ends the process on SIGALRM; the watchdog then ends its children.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(CANCEL_GRACE_S) + 3)
    raise KeyboardInterrupt


def guard_child_processes() -> None:
    """For commands that start servers (Prefect's ephemeral API, the embedded LLM): they end with this
    process even when it is SIGKILLed, and SIGINT/SIGTERM cancel within seconds. Only when run as the
    program: in-process callers (tests) keep their own children and signal handlers."""
    if not _as_program:
        return
    from tasks.reaper import start_reaper

    start_reaper()
    signal.signal(signal.SIGINT, _cancel)
    signal.signal(signal.SIGTERM, _cancel)


def _configure_prefect_from_argv(argv: list[str]) -> None:
    """Configure Prefect for the store the command line names, before any command imports anything.

    Commands call `load_settings` first, which does the same; this covers a command that imports a module
    pulling in Prefect before it reads its settings. Bad values are left for the command to report.
    """
    store = None
    for index, arg in enumerate(argv):
        if arg == "--store" and index + 1 < len(argv):
            store = argv[index + 1]
        elif arg.startswith("--store="):
            store = arg.removeprefix("--store=")
    try:
        settings = Settings()
        if store:
            settings = settings.model_copy(update={"store_url": store})
        configure_prefect(local_data_dir(settings))
    except (ValidationError, OSError, ValueError):
        pass


def main() -> None:
    """Console-script entry point."""
    global _as_program
    from selfinstruct import cli_ops, cli_train
    from selfinstruct.cli_llm import llm_app

    _as_program = True
    _configure_prefect_from_argv(sys.argv[1:])
    cli_ops.register(app)
    cli_train.register(app)
    app.add_typer(llm_app, name="llm", help="Start an LLM server (vLLM or the embedded llama.cpp).")
    try:
        app()
    except SystemExit:
        if _signalled is not None:  # click turned the KeyboardInterrupt into "Aborted!" and exit 1
            sys.exit(128 + _signalled)
        raise
