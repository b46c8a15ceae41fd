"""tasks.resources.latency: what a round changes in the process while it generates, and that it comes back."""

import gc
import sys
import threading

from tasks.resources.latency import (
    SWITCH_INTERVAL_S,
    full_collections_paused,
    generation_latency,
    quick_thread_switches,
)


def test_no_full_collection_inside_and_everything_restored_after() -> None:
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    assert interval > SWITCH_INTERVAL_S  # CPython's default, 5 ms
    with generation_latency():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[:2] == threshold[:2] and gc.get_threshold()[2] > 1_000_000
        assert sys.getswitchinterval() == SWITCH_INTERVAL_S
        # Young collections still run; a full one only when asked for.
        gc.collect(0)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == threshold
    assert sys.getswitchinterval() == interval


def test_garbage_made_inside_is_collected_on_exit() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    with full_collections_paused():
        Node()  # a reference cycle: only the cyclic collector frees it
        gc.freeze()  # as if it had lived through the round's young collections
    assert not any(isinstance(o, Node) for o in gc.get_objects())


def test_nested_and_concurrent_uses_restore_only_at_the_outermost_exit() -> None:
    interval, threshold = sys.getswitchinterval(), gc.get_threshold()
    inside = threading.Event()
    leave = threading.Event()

    def other_round() -> None:
        with generation_latency():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_round)
    with quick_thread_switches(), full_collections_paused():
        thread.start()
        assert inside.wait(10)
    # This thread left first: the other round is still generating, nothing is restored yet.
    assert sys.getswitchinterval() == SWITCH_INTERVAL_S
    assert gc.get_threshold()[2] > 1_000_000
    leave.set()
    thread.join(10)
    assert sys.getswitchinterval() == interval
    assert gc.get_threshold() == threshold
