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
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMALL_ROUND = {"prompts_per_round": 2, "max_instances": 3}


def main() -> int:
    """Run the scenario and print the table."""
    from deployments.server_api import api_request
    from deployments.state import StackLayout, StackState
    from tasks.resources.processes import free_port, poll_until
    from tasks.resources.store.rounds import Store
    from tests.support.stack import round_in_progress, stack_cli

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
        up = stack_cli("stack", "up", *up_args)
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)
        figures["stack up (new database)"] = f"{time.monotonic() - started:.0f} s"
        state = StackState.from_json(layout.state_file.read_text())
        number = poll_until(lambda: round_in_progress(store), 900, "a scheduled round in progress")
        body = {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}
        (run,) = poll_until(
            lambda: api_request(state.api_url, "POST", "/flow_runs/filter", body), 60, "a running run"
        )
        worker = next(p for p in state.processes if p.name == "worker")
        tree = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
        for process in tree:
            process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        figures["killed"] = f"worker and flow run of round {number} ({run['name']}), SIGKILL"

        def crashed() -> bool:
            return bool(
                api_request(state.api_url, "GET", f"/flow_runs/{run['id']}")["state"]["type"] == "CRASHED"
            )

        poll_until(crashed, 600, "the zombie automation marking the run Crashed")
        figures["run marked Crashed by the zombie automation after"] = f"{time.monotonic() - killed_at:.0f} s"
        down = stack_cli("stack", "down", "--data-dir", str(data_dir), timeout=300)
        restarted = time.monotonic()
        up = stack_cli("stack", "up", *up_args)
        if down.returncode != 0 or up.returncode != 0:
            raise SystemExit(down.stdout + down.stderr + up.stdout + up.stderr)
        figures["stack down + up (existing database)"] = f"{time.monotonic() - restarted:.0f} s"
        poll_until(lambda: number in store.committed_rounds(), 1200, f"round {number} committed")
        figures[f"round {number} committed by the schedule, after the restart"] = (
            f"{time.monotonic() - restarted:.0f} s"
        )
        verify = stack_cli("verify", "--store", store.url, timeout=300)
        figures["selfinstruct verify"] = "ok" if verify.returncode == 0 else verify.stdout[-300:]
        figures["manual steps"] = "none"
    finally:
        stack_cli("stack", "down", "--data-dir", str(data_dir), timeout=300)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\nCrash recovery on the local stack ({machine})\n")
    print("| step | measured |\n|---|---|")
    for name, value in figures.items():
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
