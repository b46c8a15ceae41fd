"""The local stack: a Prefect server, the deployments of prefect.yaml, a worker, the LLM and report servers.

Everything listens on 127.0.0.1 and keeps its state under one data folder (data/ by default): the server's
database and its concurrency leases (on disk, so a restart does not strand a killed run's slots), the
record of the started processes (stack.json) and their logs. `stop_stack` cancels the flow runs in flight
before it stops the processes, so the next `start_stack` finds nothing holding a slot.
"""

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deployments.processes import (
    ManagedProcess,
    StackError,
    is_running,
    prefect_command,
    run_cli,
    spawn,
    stop_process_tree,
    tail,
    wait_for_http,
)

DEFAULT_POOL = "selfinstruct-process"
DEFAULT_PORT = 4200
DEFAULT_LLM_PORT = 8081
DEFAULT_REPORT_PORT = 8082
HOST = "127.0.0.1"  # every server the stack starts listens on loopback only
PREFECT_FILE = Path("deployments/prefect.yaml")
BOOTSTRAP_DEPLOYMENT = "bootstrap-nightly"
STATE_VERSION = 2
# Flow-run heartbeats every 30 s (Prefect's minimum); a run silent for 90 s is a zombie (see below).
HEARTBEAT_S = 30
ZOMBIE_AFTER_S = 90
ZOMBIE_AUTOMATION = "selfinstruct-crash-zombie-flow-runs"
# Leases of concurrency slots kept on disk: with the default in-memory storage a server restart forgets
# them and the slots of a run killed meanwhile stay taken forever.
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
ACTIVE_STATES = ["RUNNING", "PENDING", "CANCELLING"]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
Say = Callable[[str], None]


@dataclass(frozen=True)
class StackLayout:
    """Paths of one stack: the repository it deploys and the data folder it keeps its state in."""

    root: Path
    data_dir: Path

    @property
    def prefect_home(self) -> Path:
        """PREFECT_HOME of the stack's server, worker and CLI calls (database, leases, profiles)."""
        return self.data_dir / "prefect-stack"

    @property
    def state_dir(self) -> Path:
        """Where the state file, the logs and the rendered deployments file go."""
        return self.data_dir / "stack"

    @property
    def state_file(self) -> Path:
        """The record of what `stack up` started."""
        return self.state_dir / "stack.json"

    def log(self, name: str) -> Path:
        """Log file of one component."""
        return self.state_dir / f"{name}.log"


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
    store_url: str = ""
    report_url: str | None = None
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
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise StackError(
                f"unreadable stack state ({error}); remove it after checking nothing runs"
            ) from None


@dataclass(frozen=True)
class StackOptions:
    """How to bring the stack up (the `stack up` flags)."""

    port: int = DEFAULT_PORT
    llm_port: int = DEFAULT_LLM_PORT
    report_port: int = DEFAULT_REPORT_PORT
    llm_url: str | None = None
    store_url: str | None = None
    pool: str = DEFAULT_POOL
    prefect_file: Path = PREFECT_FILE
    dry_run_finetunes: bool = False
    every_s: int | None = None
    round_config: dict[str, Any] | None = None
    data_ready_threshold: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


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


# -- the deployments file ----------------------------------------------------------------------------


def render_prefect_file(source: Path, target: Path, options: StackOptions) -> Path:
    """The deployments file as `stack up` deploys it: the source with the flags' changes, or the source.

    --dry-run-finetunes makes the data.ready trigger start dry runs; --every replaces the nightly cron with
    an interval schedule (for trying the stack out, and for the scheduler test); --round-config and
    --data-ready-threshold change the bootstrap deployment's default parameters.
    """
    import yaml

    changes = (
        options.dry_run_finetunes,
        options.every_s is not None,
        options.round_config is not None,
        options.data_ready_threshold is not None,
    )
    if not any(changes):
        return source
    spec = yaml.safe_load(source.read_text())
    for deployment in spec.get("deployments", []):
        if options.dry_run_finetunes:
            for trigger in deployment.get("triggers") or []:
                params = (trigger.get("parameters") or {}).get("params")
                if isinstance(params, dict) and "dry_run" in params:
                    params["dry_run"] = True
        if deployment.get("name") != BOOTSTRAP_DEPLOYMENT:
            continue
        if options.every_s is not None:
            deployment["schedules"] = [{"interval": options.every_s, "active": True}]
        params = deployment.setdefault("parameters", {}).setdefault("params", {})
        if options.round_config is not None:
            params["config"] = {**params.get("config", {}), **options.round_config}
        if options.data_ready_threshold is not None:
            params["data_ready_threshold"] = options.data_ready_threshold
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w") as sink:
        sink.write(f"# Generated by `selfinstruct stack up` from {source}; edit the source instead.\n")
        yaml.safe_dump(spec, sink, sort_keys=False)
    return target


# -- the Prefect server, through its REST API ---------------------------------------------------------

# The server answers 503 while its SQLite database is locked by a busy writer (seen on 2 loaded cores);
# Prefect's own client retries those, and so does this one.
_RETRY_STATUS = {429, 502, 503}


def api_request(api_url: str, method: str, path: str, json_body: Any = None, attempts: int = 6) -> Any:
    """One REST call to the Prefect server, retried on 429/502/503 and connection errors.

    Returns:
        The decoded JSON answer (None for an empty body).

    Raises:
        StackError: When the server keeps failing or refuses the request.
    """
    import httpx

    answer = ""
    for attempt in range(attempts):
        try:
            response = httpx.request(method, f"{api_url}{path}", json=json_body, timeout=30.0)
        except httpx.TransportError as error:
            answer = f"{type(error).__name__}"
        else:
            if response.status_code not in _RETRY_STATUS:
                if response.status_code >= 400:
                    raise StackError(f"{method} {path}: {response.status_code} {response.text[:300]}")
                return response.json() if response.content else None
            answer = f"{response.status_code} {response.text[:200]}"
        time.sleep(min(2.0**attempt, 10.0))
    raise StackError(f"{method} {path} failed {attempts} times; last answer: {answer}")


def zombie_automation() -> dict[str, Any]:
    """The automation Prefect documents for zombie runs: no heartbeat for 90 s -> Crashed.

    Crashed is terminal, so the server releases the run's deployment concurrency slot; the next run of
    the deployment can start, and the round's claim in the store is then taken over.
    (docs.prefect.io, "How to detect and respond to zombie flows".)
    """
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": f"Marks a flow run Crashed when it has sent no heartbeat for {ZOMBIE_AFTER_S} s "
        "(its process or machine died), which frees its concurrency slots.",
        "enabled": True,
        "trigger": {
            "type": "event",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            ],
            "for_each": ["prefect.resource.id"],
            "posture": "Proactive",
            "threshold": 1,
            "within": ZOMBIE_AFTER_S,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": f"No heartbeat for {ZOMBIE_AFTER_S} s: the run's process is gone.",
            }
        ],
    }


def ensure_automation(api_url: str, spec: dict[str, Any]) -> str:
    """Create the automation named in `spec` unless one of that name exists; returns its id."""
    body = {"automations": {"name": {"any_": [spec["name"]]}}}
    found = api_request(api_url, "POST", "/automations/filter", body)
    if found:
        return str(found[0]["id"])
    return str(api_request(api_url, "POST", "/automations/", spec)["id"])


def runs_in_flight(api_url: str, pool: str) -> list[dict[str, Any]]:
    """Flow runs of the pool that are running, starting or being cancelled."""
    body = {
        "flow_runs": {"state": {"type": {"any_": ACTIVE_STATES}}},
        "work_pools": {"name": {"any_": [pool]}},
    }
    return list(api_request(api_url, "POST", "/flow_runs/filter", body))


def set_run_state(api_url: str, run_id: str, state_type: str, message: str) -> None:
    """Ask the server to move a flow run to `state_type` (orchestration rules apply, no force)."""
    body = {"state": {"type": state_type, "message": message}, "force": False}
    api_request(api_url, "POST", f"/flow_runs/{run_id}/set_state", body)


def cancel_in_flight(api_url: str, pool: str, timeout_s: float, say: Say) -> list[str]:
    """Cancel the pool's running flow runs and wait (bounded) for the worker to stop them.

    Returns:
        Names of the runs that were cancelled.
    """
    runs = runs_in_flight(api_url, pool)
    for run in runs:
        say(f"cancelling flow run {run['name']} ({run['state']['name']})")
        if run["state"]["type"] != "CANCELLING":
            set_run_state(api_url, run["id"], "CANCELLING", "cancelled by `selfinstruct stack down`")
    deadline = time.monotonic() + timeout_s
    while runs and time.monotonic() < deadline and runs_in_flight(api_url, pool):
        time.sleep(1.0)
    return [str(run["name"]) for run in runs]


def finish_cancelling(api_url: str, pool: str) -> None:
    """After the worker is gone: runs it left in Cancelling become Cancelled, so their slots are freed."""
    for run in runs_in_flight(api_url, pool):
        set_run_state(api_url, run["id"], "CANCELLED", "stopped by `selfinstruct stack down`")


# -- bringing it up ----------------------------------------------------------------------------------


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
        ensure_work_pool(options.pool, env, layout)
        deploy_file = render_prefect_file(
            layout.root / options.prefect_file, layout.state_dir / "prefect.yaml", options
        )
        run_cli(
            prefect_command("--no-prompt", "deploy", "--all", "--prefect-file", str(deploy_file)),
            env,
            layout.root,
            layout.log("deploy"),
            "prefect deploy",
            600,
        )
        ensure_automation(api_url, zombie_automation())
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
