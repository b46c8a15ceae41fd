"""No full garbage collection while a round generates: CPython's full collections stop every thread.

A full (generation 2) collection walks every tracked object; in a 2,000-prompt round that is hundreds of
thousands of records, requests and Prefect objects, and each pass held the GIL for 150-650 ms. For that long
the client sends nothing, the servers' slots drain, and the round's busy fraction fell from 90% to 65%
(benchmarks/round.py (b)). Inside `full_collections_paused()` the objects alive at entry (modules, the pool,
Prefect's machinery) are frozen out of every collection (`gc.freeze`), and automatic full collections are off;
the young generations are still collected, which frees most short-lived cyclic garbage. On exit both are
undone and one full collection runs, outside the time-critical part.

Trade-off: cyclic garbage that survives two young collections during the round is freed only at the end, so
a very long round holds it meanwhile (its records are kept until the commit anyway).
"""

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_saved_threshold: tuple[int, int, int] | None = None
# Larger than the number of young collections any round makes: no automatic full collection.
_NEVER = 1 << 30


@contextlib.contextmanager
def full_collections_paused() -> Iterator[None]:
    """Freeze the live objects and turn automatic full collections off for the body (re-entrant)."""
    global _depth, _saved_threshold
    with _lock:
        _depth += 1
        if _depth == 1:
            gc.collect()  # before the generation starts: the frozen objects are then all live ones
            gc.freeze()
            young, middle, _ = _saved_threshold = gc.get_threshold()
            gc.set_threshold(young, middle, _NEVER)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved_threshold is not None:
                gc.set_threshold(*_saved_threshold)
                _saved_threshold = None
                gc.unfreeze()
                last = True
            else:
                last = False
        if last:
            gc.collect()
