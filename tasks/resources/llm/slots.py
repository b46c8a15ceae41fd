"""The client's cap on HTTP requests in flight, handing a freed slot to the work others wait on first."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator

from schemas.records import Stage

# Who gets a freed slot first: classification (short requests, each unlocking instance work), then
# instructions, then instances. A round's critical path runs through its instructions (dedup, classification
# and instances all wait on them), while instance requests wait on nothing and have nothing waiting on them,
# so serving upstream work first and letting instances fill every slot left over keeps the slots full to the
# end: the round's tail is then only its last instances. With instructions served last, the round ended on
# the chain last instructions -> dedup -> classification -> instances while the slots drained (busy 86-90%
# instead of 93-94% in benchmarks/round.py (b)). Within a stage slots go first come, first served, as with a
# plain semaphore.
_RANK: dict[Stage, int] = {"classify": 0, "instruction": 1, "instance": 2, "dedup": 3}


class StageSlots:
    """A semaphore of `slots` whose waiters are served by stage rank (see `_RANK`), then in arrival order."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, stage: Stage) -> AsyncIterator[None]:
        """Hold one slot for the body, waiting behind earlier waiters of the same or a later stage."""
        await self._acquire(stage)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, stage: Stage) -> None:
        if self._free > 0:  # a freed slot goes straight to a live waiter, so none waits now
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (_RANK[stage], next(self._arrival), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # handed a slot, then cancelled before using it: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():  # a cancelled waiter's future is done: skip it
                waiter.set_result(None)
                return
        self._free += 1
