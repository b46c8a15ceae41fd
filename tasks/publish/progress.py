"""Progress of long work for a person at a terminal: one process-wide sink that the CLI installs.

Library code reports with `report`; with no sink installed (a worker running a deployment, a test, a script)
that costs a lookup and does nothing. Generation reaches the sink through its existing `on_progress` hook
(tasks.resources.llm.batch): `generation_hook`
wraps the Prefect progress artifact's callback, so one call feeds both.
Nothing here imports Prefect or rich; the terminal display lives in selfinstruct/progress.py.
"""

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressUpdate:
    """A change to one line of progress; fields left None keep their last value.

    Attributes:
        key: The line, e.g. "round 3 instructions" or "evaluate base".
        done: Units done so far.
        total: Units in all, when known.
        unit: What is counted: "requests", "tasks", "steps", "rounds".
        tokens: Tokens generated so far on this line, for a tokens-per-second rate.
        note: Free text after the counts, e.g. "kept 12" or "loss 1.2345".
    """

    key: str
    done: int | None = None
    total: int | None = None
    unit: str | None = None
    tokens: int | None = None
    note: str | None = None


class ProgressSink(Protocol):
    """Receives every update while installed (from any thread)."""

    def __call__(self, update: ProgressUpdate) -> None: ...


_sink: ProgressSink | None = None
_lock = threading.Lock()


@contextmanager
def showing(sink: ProgressSink) -> Iterator[None]:
    """Install `sink` for the duration of the block (the previous one is restored after)."""
    global _sink
    with _lock:
        previous, _sink = _sink, sink
    try:
        yield
    finally:
        with _lock:
            _sink = previous


def report(update: ProgressUpdate) -> None:
    """Send an update to the installed sink, if any; a failing display never fails the work."""
    sink = _sink
    if sink is None:
        return
    try:
        sink(update)
    except Exception:
        log.exception("progress display failed")


def generation_hook(
    key: str, also: Callable[[int, int, int], None] | None = None
) -> Callable[[int, int, int], None]:
    """An `on_progress(done, total, tokens)` hook for generation that updates the terminal line `key` (in
    requests and tokens) and then calls `also` (the Prefect progress artifact's callback)."""

    def hook(done: int, total: int, tokens: int = 0) -> None:
        report(ProgressUpdate(key, done=done, total=total, unit="requests", tokens=tokens))
        if also is not None:
            also(done, total, tokens)

    return hook
