"""Processes the local stack starts: detached, recorded by (pid, start time), stopped with their descendants.

Each long-running piece gets its own session (so it is its own process group) and a log file; a stop signals
the group and every descendant that left it, escalating SIGINT -> SIGTERM -> SIGKILL, and touches a pid only
while its start time matches the record (a reused pid is left alone).
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.resources.processes import ExitedBeforeReady, tail
from tasks.resources.processes import wait_for_http as poll_http

# (signal, seconds to wait for the process tree to exit after it). SIGINT first: a Prefect worker ignored
# SIGTERM for over 10 s but stops cleanly on SIGINT.
STOP_SEQUENCE = ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


class StackError(RuntimeError):
    """The stack cannot be brought up or down as asked; the message says why and what to do."""


@dataclass
class ManagedProcess:
    """A process the stack started; (pid, create_time) identifies it even after the pid is reused."""

    name: str
    pid: int
    create_time: float
    log: str
    command: list[str]


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
    """Poll `url` until it answers 200 (the one readiness poll, `tasks.resources.processes.wait_for_http`).

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
