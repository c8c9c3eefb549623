"""Coalesced feature reads: concurrent requests share one store call and each gets exactly its rows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from features import tiles
from schemas.definitions import CARD_ACTIVITY, FeatureView
from features.store import FeatureRow
from serving.coalesce import CoalescingReader


class Store:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.delay = delay
        self.fail: Exception | None = None

    async def read(self, view: FeatureView, entities: Sequence[str]) -> list[FeatureRow]:
        self.calls.append(list(entities))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        values = tiles.window_values(view, {}, 0)
        return [FeatureRow(e, view.name, values, "missing", None, None, view.describe()) for e in entities]

    async def ping(self) -> bool:
        return True


async def test_concurrent_reads_share_one_call():
    store = Store()
    reader = CoalescingReader(store)
    wanted = [[f"c{i}"] for i in range(50)] + [["c1", "c2"], ["c1"]]
    results = await asyncio.gather(*(reader.read(CARD_ACTIVITY, w) for w in wanted))
    assert [[row.entity for row in rows] for rows in results] == wanted
    assert store.calls == [[f"c{i}" for i in range(50)]]  # one call, each entity once
    await reader.read(CARD_ACTIVITY, ["later"])  # nothing else in flight: its own call
    assert store.calls[-1] == ["later"] and await reader.ping()


async def test_batches_are_bounded():
    store = Store()
    reader = CoalescingReader(store)
    await asyncio.gather(*(reader.read(CARD_ACTIVITY, [f"c{i}"]) for i in range(1200)))
    assert [len(c) for c in store.calls] == [512, 512, 176]


async def test_failures_reach_every_waiter_and_a_timed_out_one_leaves_the_rest():
    store = Store(delay=0.05)
    reader = CoalescingReader(store)
    store.fail = ConnectionError("redis went away")
    outcomes = await asyncio.gather(
        *(reader.read(CARD_ACTIVITY, [f"c{i}"]) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    store.fail = None

    async def impatient() -> None:
        async with asyncio.timeout(0.01):
            await reader.read(CARD_ACTIVITY, ["slow"])

    patient = asyncio.ensure_future(reader.read(CARD_ACTIVITY, ["fine"]))
    with pytest.raises(TimeoutError):
        await impatient()
    assert [row.entity for row in await patient] == ["fine"]
