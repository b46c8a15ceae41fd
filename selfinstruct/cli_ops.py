"""Operations commands: `selfinstruct stack up|down|status` (the local Prefect stack) and `report`.

The stack is a Prefect server on 127.0.0.1 with its own PREFECT_HOME, the work pool and deployments of
deployments/prefect.yaml, one process worker, and the embedded LLM server. Each long-running piece is
started in its own session (so it is its own process group) and recorded with its start time in
data/stack/stack.json; `stack down` stops exactly those processes and their descendants.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from selfinstruct.console import console, fail
from tasks.processes import ExitedBeforeReady, tail
from tasks.processes import wait_for_http as poll_http

DEFAULT_POOL = "selfinstruct-process"
DEFAULT_PORT = 4200
DEFAULT_LLM_PORT = 8081
HOST = "127.0.0.1"  # every server the stack starts listens on loopback only
PREFECT_FILE = Path("deployments/prefect.yaml")
STATE_VERSION = 1
# (signal, seconds to wait for the process tree to exit after it). SIGINT first: a Prefect worker ignored
# SIGTERM for over 10 s but stops cleanly on SIGINT.
STOP_SEQUENCE = ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))

Say = Callable[[str], None]


class StackError(RuntimeError):
    """The stack cannot be brought up or down as asked; the message says why and what to do."""


# -- where things are --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackLayout:
    """Paths of one stack: the repository it deploys and the data folder it keeps its state in."""

    root: Path
    data_dir: Path

    @property
    def prefect_home(self) -> Path:
        """PREFECT_HOME of the stack's server, worker and CLI calls (database, profiles)."""
        return self.data_dir / "prefect-stack"

    @property
    def state_dir(self) -> Path:
        """Where the state file and the logs go."""
        return self.data_dir / "stack"

    @property
    def state_file(self) -> Path:
        """The record of what `stack up` started."""
        return self.state_dir / "stack.json"

    def log(self, name: str) -> Path:
        """Log file of one component."""
        return self.state_dir / f"{name}.log"


@dataclass
class ManagedProcess:
    """A process the stack started; (pid, create_time) identifies it even after the pid is reused."""

    name: str
    pid: int
    create_time: float
    log: str
    command: list[str]


@dataclass
class StackState:
    """What `stack up` recorded."""

    api_url: str
    ui_url: str
    llm_url: str | None
    pool: str
    root: str
    prefect_home: str
    started_at: str
    processes: list[ManagedProcess] = field(default_factory=list)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        """The state file's content."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "StackState":
        """Parse a state file.

        Raises:
            StackError: When the file is not a state this version wrote.
        """
        try:
            data = json.loads(text)
            processes = [ManagedProcess(**p) for p in data.pop("processes")]
            return cls(**data, processes=processes)
        except (ValueError, TypeError, KeyError) as error:
            raise StackError(
                f"unreadable stack state ({error}); remove it after checking nothing runs"
            ) from None


def read_state(layout: StackLayout) -> StackState | None:
    """The recorded stack, or None when there is none."""
    if not layout.state_file.exists():
        return None
    return StackState.from_json(layout.state_file.read_text())


def write_state(layout: StackLayout, state: StackState) -> None:
    """Record the stack (replaced atomically, so a reader never sees half a file)."""
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    partial = layout.state_file.with_suffix(".json.tmp")
    partial.write_text(state.to_json())
    partial.replace(layout.state_file)


# -- processes ---------------------------------------------------------------------------------------


def prefect_command(*args: str) -> list[str]:
    """The Prefect CLI of this interpreter's environment (no reliance on PATH)."""
    return [sys.executable, "-m", "prefect", *args]


def spawn(name: str, command: list[str], env: dict[str, str], cwd: Path, log: Path) -> ManagedProcess:
    """Start `command` detached: its own session (process group), output appended to `log`."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(name, process.pid, psutil.Process(process.pid).create_time(), str(log), command)


def _process(managed: ManagedProcess) -> Any:
    """The live psutil process of `managed`, or None when it exited (or its pid now belongs to another)."""
    import psutil

    try:
        process = psutil.Process(managed.pid)
        if abs(process.create_time() - managed.create_time) > 0.5 or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.NoSuchProcess:
        return None


def is_running(managed: ManagedProcess) -> bool:
    """True while the very process that was started is alive."""
    return _process(managed) is not None


def _group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` runs; zombies (exited, not yet reaped) do not count."""
    import psutil

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return False


def stop_process_tree(
    managed: ManagedProcess, sequence: tuple[tuple[signal.Signals, float], ...] = STOP_SEQUENCE
) -> str:
    """Stop a started process, its process group and every descendant that left the group.

    Signals escalate along `sequence` (SIGINT, then SIGTERM, then SIGKILL by default) until all are gone.

    Returns:
        How it ended: "not running", or the name of the signal that stopped the last of them.
    """
    import psutil

    leader = _process(managed)
    if leader is None:
        return "not running"
    tracked: dict[int, Any] = {leader.pid: leader}
    for sig, timeout in sequence:
        # Descendants seen so far (a worker's flow runs may have started new sessions of their own).
        if leader.is_running():
            for child in leader.children(recursive=True):
                tracked.setdefault(child.pid, child)
        if _group_alive(managed.pid):
            os.killpg(managed.pid, sig)
        for process in tracked.values():
            try:
                if process.is_running() and os.getpgid(process.pid) != managed.pid:
                    process.send_signal(sig)  # psutil refuses if the pid was reused meanwhile
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            psutil.wait_procs(list(tracked.values()), timeout=0.2)  # reaps those that are our children
            alive = any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tracked.values())
            if not alive and not _group_alive(managed.pid):
                return sig.name
            time.sleep(0.1)
    return "still running"


def wait_for_http(url: str, timeout_s: float, process: ManagedProcess, what: str) -> None:
    """Poll `url` until it answers 200.

    Raises:
        StackError: When `process` exits first or nothing answers within `timeout_s`.
    """
    try:
        poll_http(url, timeout_s, alive=lambda: is_running(process), interval_s=0.5)
    except ExitedBeforeReady:
        raise StackError(
            f"{what} exited before answering; see {process.log}:\n{tail(Path(process.log))}"
        ) from None
    except TimeoutError:
        raise StackError(
            f"{what} did not answer at {url} within {timeout_s:.0f} s; see {process.log}"
        ) from None


def run_cli(
    command: list[str], env: dict[str, str], cwd: Path, log: Path, what: str, timeout_s: float
) -> str:
    """Run a one-off command to completion, appending its output to `log`.

    Raises:
        StackError: On a non-zero exit or a timeout, with the output's tail.
    """
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise StackError(f"{what} did not finish within {timeout_s:.0f} s") from None
    output = result.stdout + result.stderr
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(command)}\n{output}\n")
    if result.returncode != 0:
        last = "\n".join(output.strip().splitlines()[-15:])
        raise StackError(f"{what} failed (exit {result.returncode}); full output in {log}:\n{last}")
    return output


# -- the stack ---------------------------------------------------------------------------------------


def base_env(layout: StackLayout, api_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every stack process: this Prefect home and API, offline, this venv first on PATH."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(layout.prefect_home),
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    env.pop("PREFECT_PROFILE", None)  # a profile from the user's home would point elsewhere
    env.update(extra or {})
    return env


def dry_run_prefect_file(source: Path, target: Path) -> Path:
    """A copy of the deployments file whose finetune trigger starts dry runs (for a stack without a GPU)."""
    import yaml

    spec = yaml.safe_load(source.read_text())
    for deployment in spec.get("deployments", []):
        for trigger in deployment.get("triggers") or []:
            params = (trigger.get("parameters") or {}).get("params")
            if isinstance(params, dict) and "dry_run" in params:
                params["dry_run"] = True
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        "# Generated by `selfinstruct stack up --dry-run-finetunes`; edit the source instead.\n"
    )
    with target.open("a") as sink:
        yaml.safe_dump(spec, sink, sort_keys=False)
    return target


def ensure_work_pool(pool: str, env: dict[str, str], layout: StackLayout) -> None:
    """Create the process work pool unless it exists (an existing pool's job template is kept)."""
    log = layout.log("deploy")
    try:
        run_cli(prefect_command("work-pool", "inspect", pool), env, layout.root, log, "inspect", 120)
    except StackError:
        run_cli(
            prefect_command("work-pool", "create", pool, "--type", "process"),
            env,
            layout.root,
            log,
            f"creating work pool {pool}",
            120,
        )


def wait_for_worker(api_url: str, pool: str, process: ManagedProcess, timeout_s: float) -> None:
    """Wait until a worker of `pool` has sent a heartbeat to the server."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_running(process):
            raise StackError(f"the worker exited; see {process.log}:\n{tail(Path(process.log))}")
        try:
            response = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5.0)
            if response.status_code == 200 and response.json():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise StackError(f"no worker of pool {pool} checked in within {timeout_s:.0f} s; see {process.log}")


def check_not_running(layout: StackLayout, say: Say) -> None:
    """Refuse to start a second stack; forget a recorded stack whose processes are all gone."""
    state = read_state(layout)
    if state is None:
        return
    alive = [p for p in state.processes if is_running(p)]
    if alive:
        pids = ", ".join(f"{p.name} {p.pid}" for p in alive)
        raise StackError(
            f"a stack is already running ({pids}; UI {state.ui_url}): run `selfinstruct stack down` first"
        )
    say(f"forgetting a stale stack record ({layout.state_file}): none of its processes runs")
    layout.state_file.unlink()


def check_ports(ports: dict[str, int]) -> None:
    """Fail before starting anything when a port is taken."""
    from tasks.llm_server import port_in_use

    for flag, port in ports.items():
        if port_in_use(port, HOST):
            raise StackError(f"port {port} on {HOST} is already in use: choose another with {flag}")


def start_stack(
    layout: StackLayout,
    port: int = DEFAULT_PORT,
    llm_port: int = DEFAULT_LLM_PORT,
    llm_url: str | None = None,
    pool: str = DEFAULT_POOL,
    prefect_file: Path = PREFECT_FILE,
    dry_run_finetunes: bool = False,
    extra_env: dict[str, str] | None = None,
    say: Say = lambda _: None,
) -> StackState:
    """Bring the stack up and record it; on any failure, stop what was started and record nothing.

    Args:
        layout: Repository root and data folder.
        port: Prefect API/UI port on 127.0.0.1.
        llm_port: Port of the embedded LLM server (ignored when `llm_url` is given).
        llm_url: An OpenAI-compatible base URL to use instead of starting the embedded server.
        pool: Process work pool to create and serve.
        prefect_file: Deployments file, relative to the root.
        dry_run_finetunes: Deploy the finetune trigger with dry_run=true.
        extra_env: More environment for every process (e.g. SELFINSTRUCT_STORE_URL).
        say: Progress messages.

    Returns:
        The recorded state.

    Raises:
        StackError: With what went wrong and where its log is.
    """
    check_not_running(layout, say)
    check_ports({"--port": port} | ({} if llm_url else {"--llm-port": llm_port}))
    if not (layout.root / prefect_file).is_file():
        raise StackError(
            f"{layout.root / prefect_file} not found: run from the repository root or pass --prefect-file"
        )
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    layout.prefect_home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{HOST}:{port}/api"
    state = StackState(
        api_url=api_url,
        ui_url=f"http://{HOST}:{port}",
        llm_url=llm_url.rstrip("/") if llm_url else f"http://{HOST}:{llm_port}/v1",
        pool=pool,
        root=str(layout.root),
        prefect_home=str(layout.prefect_home),
        started_at=datetime.now(UTC).isoformat(),
    )
    env = base_env(layout, api_url, extra_env)
    try:
        say(f"starting the Prefect server on {state.ui_url}")
        server = spawn(
            "server",
            prefect_command("server", "start", "--host", HOST, "--port", str(port)),
            env,
            layout.root,
            layout.log("server"),
        )
        state.processes.append(server)
        write_state(layout, state)  # from here on `stack down` can clean up whatever happens
        llm = None
        if llm_url is None:
            say(f"starting the embedded LLM server on {HOST}:{llm_port}")
            llm = spawn(
                "llm",
                [
                    sys.executable,
                    "-m",
                    "selfinstruct",
                    "llm",
                    "serve",
                    "--engine",
                    "llamacpp",
                    "--host",
                    HOST,
                    "--port",
                    str(llm_port),
                    "--cache-dir",
                    str(layout.data_dir / "models"),
                ],
                env,
                layout.root,
                layout.log("llm"),
            )
            state.processes.append(llm)
            write_state(layout, state)
        # A new database is migrated on first start: 30-60 s on 2 cores.
        wait_for_http(f"{api_url}/health", 300, server, "the Prefect server")
        say(f"creating work pool {pool} and deploying {prefect_file}")
        ensure_work_pool(pool, env, layout)
        deploy_file = prefect_file
        if dry_run_finetunes:
            deploy_file = dry_run_prefect_file(layout.root / prefect_file, layout.state_dir / "prefect.yaml")
        run_cli(
            prefect_command("--no-prompt", "deploy", "--all", "--prefect-file", str(deploy_file)),
            env,
            layout.root,
            layout.log("deploy"),
            "prefect deploy",
            600,
        )
        if llm is not None:
            wait_for_http(f"{state.llm_url}/models", 600, llm, "the embedded LLM server")
        say(f"starting a worker on pool {pool}")
        worker_env = env | {"SELFINSTRUCT_LLM_URL": state.llm_url or ""}
        worker = spawn(
            "worker",
            prefect_command("worker", "start", "--pool", pool, "--type", "process"),
            worker_env,
            layout.root,
            layout.log("worker"),
        )
        state.processes.append(worker)
        write_state(layout, state)
        wait_for_worker(api_url, pool, worker, 180)
    except BaseException:
        # Includes Ctrl-C while waiting: leave nothing behind.
        for managed in reversed(state.processes):
            stop_process_tree(managed)
        layout.state_file.unlink(missing_ok=True)
        raise
    return state


def stop_stack(layout: StackLayout, say: Say = lambda _: None) -> list[tuple[str, int, str]]:
    """Stop the recorded processes (worker first, server last) and forget the stack.

    Returns:
        (name, pid, how it ended) per process; empty when no stack was recorded.
    """
    state = read_state(layout)
    if state is None:
        return []
    outcomes = []
    order = {"worker": 0, "llm": 1, "server": 2}
    for managed in sorted(state.processes, key=lambda p: order.get(p.name, 1)):
        say(f"stopping {managed.name} (pid {managed.pid})")
        outcome = stop_process_tree(managed)
        outcomes.append((managed.name, managed.pid, outcome))
    if any(outcome == "still running" for *_, outcome in outcomes):
        raise StackError(
            f"some processes survived SIGKILL: {outcomes}; the state stays in {layout.state_file}"
        )
    layout.state_file.unlink(missing_ok=True)
    return outcomes


def health(state: StackState) -> dict[str, bool]:
    """Whether the API and the LLM server answer right now."""
    import httpx

    def answers(url: str) -> bool:
        try:
            return httpx.get(url, timeout=3.0).status_code == 200
        except httpx.HTTPError:
            return False

    checks = {"api": answers(f"{state.api_url}/health")}
    if state.llm_url:
        checks["llm"] = answers(f"{state.llm_url}/models")
    return checks


# -- command line ------------------------------------------------------------------------------------

stack_app = typer.Typer(
    help="The local stack: Prefect server, work pool, deployments, worker and LLM server on 127.0.0.1.",
    no_args_is_help=True,
    add_completion=False,
)


def _layout(data_dir: Path) -> StackLayout:
    return StackLayout(root=Path.cwd().resolve(), data_dir=data_dir.expanduser().resolve())


DataDirOption = Annotated[Path, typer.Option(help="Folder for the stack's Prefect home, state and logs.")]


@stack_app.command("up")
def stack_up(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Prefect API and UI port.")] = DEFAULT_PORT,
    llm_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Embedded LLM server port.")
    ] = DEFAULT_LLM_PORT,
    llm_url: Annotated[
        str | None, typer.Option(help="Use this OpenAI-compatible base URL instead of the embedded server.")
    ] = None,
    pool: Annotated[str, typer.Option(help="Process work pool to create and serve.")] = DEFAULT_POOL,
    prefect_file: Annotated[Path, typer.Option(help="Deployments file, relative to the repository root.")] = (
        PREFECT_FILE
    ),
    dry_run_finetunes: Annotated[
        bool,
        typer.Option("--dry-run-finetunes", help="Deploy the data.ready trigger with dry_run=true (no GPU)."),
    ] = False,
    data_dir: DataDirOption = Path("data"),
) -> None:
    """Start the server, deploy, start a worker and the LLM server; print the UI URL."""
    layout = _layout(data_dir)
    try:
        with console.status("bringing the stack up...") as status:
            state = start_stack(
                layout,
                port,
                llm_port,
                llm_url,
                pool,
                prefect_file,
                dry_run_finetunes,
                say=lambda message: status.update(message),
            )
    except StackError as error:
        fail(str(error), code=1)
    table = Table(title="selfinstruct stack", show_header=False)
    table.add_row("UI", f"[bold green]{state.ui_url}[/]")
    table.add_row("API", f"export PREFECT_API_URL={state.api_url}")
    table.add_row("LLM", state.llm_url or "-")
    table.add_row("work pool", state.pool)
    for managed in state.processes:
        table.add_row(managed.name, f"pid {managed.pid}, log {managed.log}")
    console.print(table)
    console.print(
        "Run a round now: prefect deployment run 'bootstrap-round/bootstrap-nightly'", highlight=False
    )
    console.print("Stop everything: selfinstruct stack down", style="dim")


@stack_app.command("down")
def stack_down(data_dir: DataDirOption = Path("data")) -> None:
    """Stop exactly the processes `stack up` started (SIGINT, then SIGTERM, then SIGKILL)."""
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
    from tasks.report import render_report, save_report
    from tasks.store import StoreError

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
