"""The terminal's progress display for `run`, `evaluate` and `finetune`: rich progress bars fed by the
process-wide sink of tasks.publish.progress. Shown
only when stdout is a terminal; otherwise nothing is drawn and
nothing is printed, so piped output and logs stay as they were.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from tasks.publish.progress import ProgressUpdate, showing


class TerminalProgress:
    """A progress sink drawing one bar per key: done/total unit, tokens/s when tokens come, and the note."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._rows: dict[str, TaskID] = {}
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, update: ProgressUpdate) -> None:
        with self._lock:
            row = self._rows.get(update.key)
            if row is None:
                row = self.progress.add_task(update.key, total=update.total, unit="", rate="", note="")
                self._rows[update.key] = row
                self._started[update.key] = time.monotonic()
            fields: dict[str, Any] = {}
            if update.unit is not None:
                fields["unit"] = update.unit
            if update.note is not None:
                fields["note"] = update.note
            if update.tokens:
                elapsed = time.monotonic() - self._started[update.key]
                fields["rate"] = f"{update.tokens / elapsed:.0f} tok/s" if elapsed > 0 else ""
            self.progress.update(row, completed=update.done, total=update.total, **fields)


def _console_handlers() -> list[Any]:
    """Prefect's rich console log handlers (they hold their own Console, bound to the real stderr)."""
    found = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler).__name__ == "PrefectConsoleHandler" and hasattr(handler, "console"):
                found.append(handler)
    return found


@contextmanager
def terminal_progress(console: Console) -> Iterator[None]:
    """Show progress bars on `console` for the duration of the block, when it is a terminal.

    Prefect's console log lines are printed through the same console while the bars are up, so that they
    scroll above the bars instead of tearing them.
    """
    if not console.is_terminal:
        yield
        return
    display = TerminalProgress(console)
    handlers = _console_handlers()
    saved = [handler.console for handler in handlers]
    with display.progress, showing(display):
        for handler in handlers:
            handler.console = console
        try:
            yield
        finally:
            for handler, original in zip(handlers, saved, strict=True):
                handler.console = original
