"""The running Prefect server, through its REST API: retried calls, the pool's runs in flight, its worker.

Plain httpx against `{api_url}` (no Prefect client), so `stack down` works from any process and the tests
and benchmarks that drive a running stack make their calls the same way.
"""

import contextlib
import time
from pathlib import Path
from typing import Any

from deployments.processes import ManagedProcess, StackError, is_running
from deployments.state import Say
from tasks.resources.processes import poll_until, tail

ACTIVE_STATES = ["RUNNING", "PENDING", "CANCELLING"]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
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
    if runs:
        with contextlib.suppress(TimeoutError):  # what is left is finished by `finish_cancelling`
            poll_until(lambda: not runs_in_flight(api_url, pool), timeout_s, "the runs to stop")
    return [str(run["name"]) for run in runs]


def finish_cancelling(api_url: str, pool: str) -> None:
    """After the worker is gone: runs it left in Cancelling become Cancelled, so their slots are freed."""
    for run in runs_in_flight(api_url, pool):
        set_run_state(api_url, run["id"], "CANCELLED", "stopped by `selfinstruct stack down`")


def wait_for_worker(api_url: str, pool: str, process: ManagedProcess, timeout_s: float) -> None:
    """Wait until a worker of `pool` has sent a heartbeat to the server.

    Raises:
        StackError: When the worker exits first or none checks in within `timeout_s`.
    """
    import httpx

    def checked_in() -> bool:
        if not is_running(process):
            raise StackError(f"the worker exited; see {process.log}:\n{tail(Path(process.log))}")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5.0)
            return response.status_code == 200 and bool(response.json())
        return False

    try:
        poll_until(checked_in, timeout_s, f"a worker of pool {pool}")
    except TimeoutError:
        raise StackError(
            f"no worker of pool {pool} checked in within {timeout_s:.0f} s; see {process.log}"
        ) from None
