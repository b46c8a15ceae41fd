"""The client's cap on HTTP requests in flight, handing a freed slot to the stage that unblocks most work."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator

from schemas.records import Stage

# Waiters of a later stage get a freed slot before instruction requests: a pipelined round queues all its
# instruction requests at once, and its classification and instance requests (which the round's end waits for)
# must not queue behind them. Classification goes first of all: its requests are short and each one unlocks
# instance requests, so serving it first keeps work queued for every slot; when it came after the instances,
# a round's last classifications queued behind instance requests while the slots drained (benchmarks/round.py
# (b)). Within a stage slots go first come, first served, as with a plain semaphore.
_RANK: dict[Stage, int] = {"classify": 0, "instance": 1, "dedup": 2, "instruction": 3}


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
