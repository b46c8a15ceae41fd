"""tasks.resources.llm.slots: the in-flight cap serves the work others wait on first; no slot is lost."""

from __future__ import annotations

import asyncio

from schemas.records import Stage
from tasks.resources.llm.slots import StageSlots


class _Holders:
    """Holders of a StageSlots that record the order they get a slot in; "first" keeps its slot until
    `release` is set."""

    def __init__(self, slots: StageSlots) -> None:
        self.slots = slots
        self.order: list[str] = []
        self.release = asyncio.Event()

    async def use(self, stage: Stage, name: str) -> None:
        async with self.slots.hold(stage):
            self.order.append(name)
            if name == "first":
                await self.release.wait()


async def _served_order(slots: StageSlots, waiting: list[tuple[Stage, str]]) -> list[str]:
    """Who gets the one slot, in order: `first` holds it while the others queue up in the given order."""
    holders = _Holders(slots)
    order, release, use = holders.order, holders.release, holders.use
    first = asyncio.create_task(use("instruction", "first"))
    await asyncio.sleep(0)
    others = []
    for stage, name in waiting:
        others.append(asyncio.create_task(use(stage, name)))
        await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *others)
    return order


def test_a_freed_slot_goes_to_classification_then_instructions_then_instances() -> None:
    waiting: list[tuple[Stage, str]] = [
        ("instruction", "i0"),
        ("classify", "c0"),
        ("instruction", "i1"),
        ("instance", "x0"),
        ("classify", "c1"),
    ]
    order = asyncio.run(_served_order(StageSlots(1), waiting))
    assert order == ["first", "c0", "c1", "i0", "i1", "x0"]


def test_a_cancelled_waiter_loses_no_slot() -> None:
    async def scenario() -> list[str]:
        slots = StageSlots(1)
        holders = _Holders(slots)
        order, release, use = holders.order, holders.release, holders.use
        first = asyncio.create_task(use("instruction", "first"))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(use("instance", "doomed"))
        later = asyncio.create_task(use("instruction", "later"))
        await asyncio.sleep(0)
        doomed.cancel()
        release.set()
        await asyncio.gather(first, later)
        # Every slot is back: two more holders get in at once.
        async with slots.hold("instruction"):
            order.append("again")
        return order

    assert asyncio.run(scenario()) == ["first", "later", "again"]


def test_a_slot_granted_to_a_waiter_cancelled_before_it_ran_is_passed_on() -> None:
    async def scenario() -> list[str]:
        slots = StageSlots(1)
        order: list[str] = []
        hold = slots.hold("instruction")
        await hold.__aenter__()
        granted = asyncio.create_task(slots.hold("instance").__aenter__())
        await asyncio.sleep(0)
        after = asyncio.create_task(_append(slots, order))
        await asyncio.sleep(0)
        await hold.__aexit__(None, None, None)  # hands the slot to `granted`, which has not resumed yet
        granted.cancel()
        await asyncio.gather(granted, return_exceptions=True)
        await after
        return order

    assert asyncio.run(scenario()) == ["after"]


async def _append(slots: StageSlots, order: list[str]) -> None:
    async with slots.hold("instruction"):
        order.append("after")
