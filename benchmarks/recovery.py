"""Crash recovery on the local stack, timed: SIGKILL the worker mid-round and let the stack heal itself.

Usage, from the repository root: `.venv/bin/python benchmarks/recovery.py` (about 10 minutes on 2 cores).

1. `selfinstruct stack up --every 60` with small rounds, in a scratch data folder, on free ports.
2. Wait until a scheduled round has persisted completions, then SIGKILL the worker and the flow-run process
   (what a machine crash does to them): the run stays Running, holding its deployment and store slots.
3. Measure how long until the zombie automation (no heartbeat for 90 s) marks the run Crashed.
4. `stack down` and `stack up` (the "reboot"), and measure how long until the schedule alone commits the
   interrupted round under its number; then `selfinstruct verify`.
Baseline: without the automation and the on-disk leases, step 3 never happens and no later run starts.
Prints a table; README records it with the machine.
"""

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
SMALL_ROUND = {"prompts_per_round": 2, "max_instances": 3}


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`selfinstruct ...` in a clean environment (no PREFECT_/SELFINSTRUCT_ variables of the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SELFINSTRUCT_"))}
    env |= {"PREFECT_WORKER_QUERY_SECONDS": "2", "COLUMNS": "200"}
    command = [sys.executable, "-m", "selfinstruct", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll until `condition` is truthy; exit with a message after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(1.0)
    raise SystemExit(f"gave up: {what} did not happen within {timeout_s:.0f} s")


def free_port() -> int:
    """A free TCP port on loopback."""
    from tasks.resources.processes import free_port as pick

    return pick()


def main() -> int:
    """Run the scenario and print the table."""
    from deployments.stack import StackLayout, StackState
    from tasks.resources.store.rounds import Store

    data_dir = Path(tempfile.mkdtemp(prefix="selfinstruct-recovery-"))
    config = data_dir / "round.json"
    config.write_text(json.dumps(SMALL_ROUND))
    store = Store(str(data_dir / "store"))
    ports = ["--port", str(free_port()), "--llm-port", str(free_port()), "--report-port", str(free_port())]
    up_args = [*ports, "--every", "60", "--round-config", str(config), "--store", store.url]
    up_args += ["--data-dir", str(data_dir)]
    layout = StackLayout(ROOT, data_dir)
    figures: dict[str, str] = {}
    try:
        started = time.monotonic()
        up = cli("stack", "up", *up_args)
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)
        figures["stack up (new database)"] = f"{time.monotonic() - started:.0f} s"
        state = StackState.from_json(layout.state_file.read_text())
        api = httpx.Client(base_url=state.api_url, timeout=30.0)

        def in_progress() -> int | None:
            for number in store.uncommitted_rounds():
                if list(Path(store.location(number), "completions").glob("*.parquet")):
                    return int(number)
            return None

        number = wait_for(in_progress, 900, "a scheduled round in progress")
        body = {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}
        (run,) = wait_for(lambda: api.post("/flow_runs/filter", json=body).json(), 60, "a running run")
        worker = next(p for p in state.processes if p.name == "worker")
        tree = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
        for process in tree:
            process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        figures["killed"] = f"worker and flow run of round {number} ({run['name']}), SIGKILL"

        def crashed() -> bool:
            return bool(api.get(f"/flow_runs/{run['id']}").json()["state"]["type"] == "CRASHED")

        wait_for(crashed, 600, "the zombie automation marking the run Crashed")
        figures["run marked Crashed by the zombie automation after"] = f"{time.monotonic() - killed_at:.0f} s"
        down = cli("stack", "down", "--data-dir", str(data_dir), timeout=300)
        restarted = time.monotonic()
        up = cli("stack", "up", *up_args)
        if down.returncode != 0 or up.returncode != 0:
            raise SystemExit(down.stdout + down.stderr + up.stdout + up.stderr)
        figures["stack down + up (existing database)"] = f"{time.monotonic() - restarted:.0f} s"
        state = StackState.from_json(layout.state_file.read_text())
        api = httpx.Client(base_url=state.api_url, timeout=30.0)
        wait_for(lambda: number in store.committed_rounds(), 1200, f"round {number} committed")
        figures[f"round {number} committed by the schedule, after the restart"] = (
            f"{time.monotonic() - restarted:.0f} s"
        )
        verify = cli("verify", "--store", store.url, timeout=300)
        figures["selfinstruct verify"] = "ok" if verify.returncode == 0 else verify.stdout[-300:]
        figures["manual steps"] = "none"
    finally:
        cli("stack", "down", "--data-dir", str(data_dir), timeout=300)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\nCrash recovery on the local stack ({machine})\n")
    print("| step | measured |\n|---|---|")
    for name, value in figures.items():
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
