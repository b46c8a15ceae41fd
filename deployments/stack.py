"""The local stack's lifecycle: bring up a Prefect server, the LLM and report servers and a worker, bring
them down, and say whether they answer.

Everything listens on 127.0.0.1 and keeps its state under one data folder (data/ by default): the server's
database and its concurrency leases (on disk, so a restart does not strand a killed run's slots), the
record of the started processes (stack.json) and their logs. `stop_stack` cancels the flow runs in flight
before it stops the processes, so the next `start_stack` finds nothing holding a slot. What is registered
on the server lives in `deployments.registration`, the REST calls in `deployments.server_api`.
"""

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from deployments.processes import (
    ManagedProcess,
    StackError,
    is_running,
    prefect_command,
    spawn,
    stop_process_tree,
    wait_for_http,
)
from deployments.registration import HEARTBEAT_S, register
from deployments.server_api import cancel_in_flight, finish_cancelling, wait_for_worker
from deployments.state import (
    HOST,
    Say,
    StackLayout,
    StackOptions,
    StackState,
    read_state,
    write_state,
)

# Leases of concurrency slots kept on disk: with the default in-memory storage a server restart forgets
# them and the slots of a run killed meanwhile stay taken forever.
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def base_env(layout: StackLayout, api_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every stack process: this Prefect home and API, offline, this venv first on PATH."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(layout.prefect_home),
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    env.pop("PREFECT_PROFILE", None)  # a profile from the user's home would point elsewhere
    env.update(extra or {})
    return env


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
    from tasks.resources.processes import port_in_use

    for flag, port in ports.items():
        if port_in_use(port, HOST):
            raise StackError(f"port {port} on {HOST} is already in use: choose another with {flag}")


def resolve_store_url(layout: StackLayout, store_url: str | None) -> str:
    """The store the worker's runs use: as given, or <data dir>; local folders made absolute."""
    url = store_url or str(layout.data_dir)
    if "://" in url and not url.startswith("file://"):
        return url
    return str(Path(url.removeprefix("file://")).expanduser().resolve())


def _spawn_recorded(
    layout: StackLayout, state: StackState, name: str, command: list[str], env: dict[str, str]
) -> ManagedProcess:
    managed = spawn(name, command, env, layout.root, layout.log(name))
    state.processes.append(managed)
    write_state(layout, state)  # from here on `stack down` can clean up whatever happens
    return managed


def start_stack(layout: StackLayout, options: StackOptions, say: Say = lambda _: None) -> StackState:
    """Bring the stack up and record it; on any failure, stop what was started and record nothing.

    Returns:
        The recorded state.

    Raises:
        StackError: With what went wrong and where its log is.
    """
    check_not_running(layout, say)
    ports = {"--port": options.port, "--report-port": options.report_port}
    check_ports(ports | ({} if options.llm_url else {"--llm-port": options.llm_port}))
    if not (layout.root / options.prefect_file).is_file():
        raise StackError(
            f"{layout.root / options.prefect_file} not found: run from the repository root or pass "
            "--prefect-file"
        )
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    layout.prefect_home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{HOST}:{options.port}/api"
    llm_url = options.llm_url.rstrip("/") if options.llm_url else f"http://{HOST}:{options.llm_port}/v1"
    state = StackState(
        api_url=api_url,
        ui_url=f"http://{HOST}:{options.port}",
        llm_url=llm_url,
        pool=options.pool,
        root=str(layout.root),
        prefect_home=str(layout.prefect_home),
        started_at=datetime.now(UTC).isoformat(),
        store_url=resolve_store_url(layout, options.store_url),
        report_url=f"http://{HOST}:{options.report_port}",
    )
    # What the deployments' job_variables.env templates ({{ $SELFINSTRUCT_... }}) and every flow run see.
    selfinstruct_env = {
        "SELFINSTRUCT_STORE_URL": state.store_url,
        "SELFINSTRUCT_LLM_URL": llm_url,
        "SELFINSTRUCT_MODEL": os.environ.get("SELFINSTRUCT_MODEL", "smollm2-135m-instruct"),
        "SELFINSTRUCT_REPORT_URL": state.report_url or "",
    }
    env = base_env(layout, api_url, options.extra_env | selfinstruct_env)
    try:
        say(f"starting the Prefect server on {state.ui_url}")
        command = prefect_command("server", "start", "--host", HOST, "--port", str(options.port))
        server = _spawn_recorded(layout, state, "server", command, env)
        llm = None
        if options.llm_url is None:
            say(f"starting the embedded LLM server on {HOST}:{options.llm_port}")
            llm_command = [sys.executable, "-m", "selfinstruct", "llm", "serve", "--engine", "llamacpp"]
            llm_command += ["--host", HOST, "--port", str(options.llm_port)]
            llm_command += ["--cache-dir", str(layout.data_dir / "models")]
            llm = _spawn_recorded(layout, state, "llm", llm_command, env)
        say(f"starting the report server on {state.report_url}")
        report_command = [sys.executable, "-m", "tasks.publish.report_server", "--store", state.store_url]
        report_command += ["--host", HOST, "--port", str(options.report_port)]
        report = _spawn_recorded(layout, state, "report", report_command, env)
        # A new database is migrated on first start: 30-60 s on 2 cores.
        wait_for_http(f"{api_url}/health", 300, server, "the Prefect server")
        say(f"creating work pool {options.pool} and deploying {options.prefect_file}")
        register(layout, options, api_url, env)
        wait_for_http(f"{state.report_url}/health", 60, report, "the report server")
        if llm is not None:
            wait_for_http(f"{llm_url}/models", 600, llm, "the embedded LLM server")
        say(f"starting a worker on pool {options.pool}")
        worker_env = env | {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
        command = prefect_command("worker", "start", "--pool", options.pool, "--type", "process")
        worker = _spawn_recorded(layout, state, "worker", command, worker_env)
        wait_for_worker(api_url, options.pool, worker, 180)
    except BaseException:
        # Includes Ctrl-C while waiting: leave nothing behind.
        for managed in reversed(state.processes):
            stop_process_tree(managed)
        layout.state_file.unlink(missing_ok=True)
        raise
    return state


# -- bringing it down --------------------------------------------------------------------------------


def stop_stack(
    layout: StackLayout, say: Say = lambda _: None, cancel_timeout_s: float = 60.0
) -> list[tuple[str, int, str]]:
    """Cancel the runs in flight, stop the recorded processes (worker first, server last), forget the stack.

    Returns:
        (name, pid, how it ended) per process; empty when no stack was recorded.
    """
    state = read_state(layout)
    if state is None:
        return []
    server_up = any(p.name == "server" and is_running(p) for p in state.processes)
    if server_up:
        try:
            cancel_in_flight(state.api_url, state.pool, cancel_timeout_s, say)
        except Exception as error:  # a sick server must not keep the stack from stopping
            say(f"could not cancel the runs in flight ({type(error).__name__}: {error})")
    outcomes = []
    order = {"worker": 0, "llm": 1, "report": 1, "server": 2}
    for managed in sorted(state.processes, key=lambda p: order.get(p.name, 1)):
        if managed.name == "server" and server_up:
            try:
                finish_cancelling(state.api_url, state.pool)
            except Exception as error:
                say(f"could not finish cancelling ({type(error).__name__}: {error})")
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
    """Whether the API, the LLM server and the report server answer right now."""
    import httpx

    def answers(url: str) -> bool:
        try:
            return httpx.get(url, timeout=3.0).status_code == 200
        except httpx.HTTPError:
            return False

    checks = {"api": answers(f"{state.api_url}/health")}
    if state.llm_url:
        checks["llm"] = answers(f"{state.llm_url}/models")
    if state.report_url:
        checks["report"] = answers(f"{state.report_url}/health")
    return checks
