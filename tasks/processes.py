"""Waiting on a server process: poll its HTTP endpoint until it answers, and quote its log when it does not.

The one readiness poll and log tail of the project: the embedded LLM server, vLLM and the local stack's
Prefect server all use these. httpx is imported only when polling, so the CLI can import this module cheaply.
"""

import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path


class ExitedBeforeReady(RuntimeError):
    """The process being waited on exited before its endpoint answered."""


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file, for error messages ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


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

    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0, headers=dict(headers or {})) as client:
        while True:
            if alive is not None and not alive():
                raise ExitedBeforeReady(f"process exited before {url} answered")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:g}s")
            time.sleep(interval_s)
