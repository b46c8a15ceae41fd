"""Server processes: free ports, polling until a deadline, quoting a log, stopping cleanly.

The one poll, readiness poll and log tail of the project: the embedded LLM server, vLLM and the local stack's
Prefect server all use these. httpx is imported only when polling, so the CLI can import this module cheaply.
"""

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ExitedBeforeReady(RuntimeError):
    """The process being waited on exited before its endpoint answered."""


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file, for error messages ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def poll_until(condition: Callable[[], T], timeout_s: float, what: str, every_s: float = 1.0) -> T:
    """Call `condition` every `every_s` seconds until it returns something truthy; return that.

    The one poll-until-a-deadline of the project: readiness polls, the stack's waits on its worker and on
    cancelled runs, and the tests and benchmarks that wait on a running stack.

    Raises:
        TimeoutError: Nothing truthy within `timeout_s`; the message names `what` was awaited.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:g} s")
        time.sleep(every_s)


def wait_for_http(
    url: str,
    timeout_s: float,
    *,
    alive: Callable[[], bool] | None = None,
    headers: Mapping[str, str] | None = None,
    interval_s: float = 0.25,
) -> None:
    """Poll `url` with GET until it answers 200.

    Args:
        url: The endpoint to poll (e.g. a server's /v1/models or /api/health).
        timeout_s: Give up after this long.
        alive: Called before each try; when it returns False the process is gone and waiting stops at once.
        headers: Request headers (a bearer token for servers started with one).
        interval_s: Pause between tries.

    Raises:
        ExitedBeforeReady: `alive()` returned False first.
        TimeoutError: No 200 within `timeout_s`.
    """
    import httpx

    with httpx.Client(timeout=5.0, headers=dict(headers or {})) as client:

        def answers() -> bool:
            if alive is not None and not alive():
                raise ExitedBeforeReady(f"process exited before {url} answered")
            with contextlib.suppress(httpx.HTTPError):
                return client.get(url).status_code == 200
            return False

        poll_until(answers, timeout_s, f"{url} to answer", every_s=interval_s)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could not bind `host:port` right now (something listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: connections of a stopped server lingering in TIME_WAIT do not block the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0 themselves, like vLLM)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_ready(
    url: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    api_key: str | None = None,
) -> None:
    """Poll `{url}/models` until the server answers 200.

    Args:
        url: Base URL ending in /v1.
        timeout_s: Give up after this long.
        process: The server's process; if it exits, stop waiting at once.
        api_key: Bearer token, for servers started with one.

    Raises:
        TimeoutError: No answer in time.
        RuntimeError: The process exited first.
    """
    try:
        wait_for_http(
            f"{url.rstrip('/')}/models",
            timeout_s,
            alive=None if process is None else lambda: process.poll() is None,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )
    except ExitedBeforeReady:
        assert process is not None
        raise RuntimeError(f"server process exited with code {process.returncode} before answering") from None
    except TimeoutError:
        raise TimeoutError(f"{url} did not answer within {timeout_s:g}s") from None


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int:
    """Ask a server process to stop (SIGTERM), and kill it if it has not exited after `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
