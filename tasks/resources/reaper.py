"""No orphans: a watchdog that ends this process's descendants when this process ends, even by SIGKILL.

Prefect's ephemeral API server (uvicorn) and the embedded LLM server are children of the CLI. When the CLI is
SIGKILLed, nothing stops them: they are reparented to init and run forever. A parent-death signal
(PR_SET_PDEATHSIG) would have to be set inside each child, and Prefect starts its server itself; it also
fires when the *thread* that started a child exits, not the process. So instead the CLI starts this small
watchdog in its own session, holding the write end of a pipe to it. The watchdog lists the CLI's descendants
every half second (from /proc, with each one's start time, so a reused pid is never hit); when the pipe
reaches EOF (the CLI is gone, however it ended) it sends SIGTERM to those still alive, then SIGKILL after a
grace period, and exits. Linux only; elsewhere `start_reaper` does nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 5.0

_reaper: subprocess.Popen[bytes] | None = None


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of `root` as {pid: start time}."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is not None:
            parents.setdefault(stat[0], []).append(int(entry))
            starts[int(entry)] = stat[1]
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            if child not in found and child in starts:
                found[child] = starts[child]
                stack.append(child)
    return found


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == start


def _signal_all(known: dict[int, int], sig: signal.Signals) -> None:
    for pid, start in known.items():
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def watch(parent: int, fd: int = 0) -> None:
    """Track `parent`'s descendants until `fd` reaches EOF, then end those still alive."""
    me = os.getpid()
    known: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready and not os.read(fd, 4096):
            break
        known.update((pid, start) for pid, start in descendants(parent).items() if pid != me)
    known.pop(me, None)
    _signal_all(known, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in known.items()):
        time.sleep(0.1)
    _signal_all(known, signal.SIGKILL)


def start_reaper() -> None:
    """Start the watchdog for this process (once). Its pipe closes when this process ends, however."""
    global _reaper
    if _reaper is not None or not sys.platform.startswith("linux"):
        return
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "tasks.resources.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # a Ctrl-C to the CLI's process group must not stop the watchdog
    )


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
