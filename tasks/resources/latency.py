"""Process-wide settings that keep the LLM client answering at once while a round generates.

The client's event loop shares the process (and the GIL) with the pipeline's thread, Prefect's task-run
threads and its API calls. Two CPython defaults delay it by whole milliseconds to whole tenths of a second,
and every delay leaves a server slot without a request (benchmarks/round.py (b), 2,000 prompts, two cores):

- A full (generation 2) garbage collection walks every tracked object, hundreds of thousands of records,
  requests and Prefect objects, holding the GIL for 150-650 ms about ten times a round: busy fell from 90% to
  65%. `full_collections_paused()` freezes the objects alive at entry out of every collection (`gc.freeze`)
  and turns automatic full collections off; the young generations are still collected, which frees most
  short-lived cyclic garbage. On exit both are undone and one full collection runs, outside the time-critical
  part (a round leaves the pause after its commit). Trade-off: cyclic garbage that survives two young
  collections is freed only at the end (a round keeps its records until the commit anyway).
- A thread that wants the GIL waits up to the switch interval (5 ms by default) while another thread runs
  Python code. `quick_thread_switches()` makes it 1 ms: the time from an answer to the next request sent
  fell from 6-20 ms to 3-4 ms at the 90th percentile, busy from 88-91% to 90-93%.

`generation_latency()` applies both. All are re-entrant: rounds may run in threads of one process (tests).
"""

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator

# Larger than the number of young collections any round makes: no automatic full collection.
_NEVER = 1 << 30
SWITCH_INTERVAL_S = 0.001

_lock = threading.Lock()
_gc_depth = 0
_saved_threshold: tuple[int, int, int] | None = None
_switch_depth = 0
_saved_interval: float | None = None


@contextlib.contextmanager
def full_collections_paused() -> Iterator[None]:
    """Freeze the live objects and turn automatic full collections off for the body (re-entrant)."""
    global _gc_depth, _saved_threshold
    with _lock:
        _gc_depth += 1
        if _gc_depth == 1:
            # No collection first (it took 0.2 s before the first request): garbage frozen with the live
            # objects is freed by the collection on exit.
            gc.freeze()
            young, middle, _ = _saved_threshold = gc.get_threshold()
            gc.set_threshold(young, middle, _NEVER)
    try:
        yield
    finally:
        with _lock:
            _gc_depth -= 1
            saved, last = _saved_threshold, _gc_depth == 0
            if last and saved is not None:
                gc.set_threshold(*saved)
                _saved_threshold = None
                gc.unfreeze()
        if last:
            gc.collect()


@contextlib.contextmanager
def quick_thread_switches(interval_s: float = SWITCH_INTERVAL_S) -> Iterator[None]:
    """Hand the GIL to a waiting thread after `interval_s` instead of CPython's 5 ms (re-entrant; the
    setting in force at the outermost entry comes back at its exit)."""
    global _switch_depth, _saved_interval
    with _lock:
        _switch_depth += 1
        if _switch_depth == 1:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval_s, _saved_interval))
    try:
        yield
    finally:
        with _lock:
            _switch_depth -= 1
            if _switch_depth == 0 and _saved_interval is not None:
                sys.setswitchinterval(_saved_interval)
                _saved_interval = None


@contextlib.contextmanager
def generation_latency() -> Iterator[None]:
    """Both of the above, for the body."""
    with full_collections_paused(), quick_thread_switches():
        yield
