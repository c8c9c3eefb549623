"""Coalesced feature reads: concurrent requests share one store call, whatever their views and entities,
and each gets exactly its rows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from features import tiles
from features.store import FeatureRow
from schemas.definitions import Entity, Feature, FeatureView, Source
from serving.coalesce import CoalescingReader

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Visit",
    "namespace": "test.coalesce",
    "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "page_id", "type": "string"},
        {"name": "ts", "type": "long"},
    ],
}
VISITS = Source("visits", SCHEMA, key="user_id", event_time="ts")
BY_USER = FeatureView("by_user", VISITS, Entity("user", "user_id"), [Feature("n", "count")], window="1h")
BY_PAGE = FeatureView("by_page", VISITS, Entity("page", "page_id"), [Feature("n_page", "count")], window="1h")


class Store:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[list[tuple[str, str]]] = []
        self.delay = delay
        self.fail: Exception | None = None

    async def read_pairs(self, pairs: Sequence[tuple[FeatureView, str]]) -> list[FeatureRow]:
        self.calls.append([(view.name, entity) for view, entity in pairs])
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return [
            FeatureRow(e, v.name, tiles.window_values(v, {}, 0), "missing", None, None, v.describe())
            for v, e in pairs
        ]

    async def ping(self) -> bool:
        return True


def names(rows: Sequence[FeatureRow]) -> list[tuple[str, str]]:
    return [(row.view, row.entity) for row in rows]


async def test_concurrent_reads_share_one_call():
    store = Store()
    reader = CoalescingReader(store)
    wanted = [[(BY_USER, f"u{i}"), (BY_PAGE, f"p{i % 5}")] for i in range(50)]
    wanted += [[(BY_USER, "u1"), (BY_USER, "u2")], [(BY_PAGE, "p1")]]
    results = await asyncio.gather(*(reader.read_pairs(w) for w in wanted))
    assert [names(rows) for rows in results] == [[(v.name, e) for v, e in w] for w in wanted]
    # one call, each (view, entity) once, in the order first asked for
    expected = list(dict.fromkeys((v.name, e) for w in wanted for v, e in w))
    assert store.calls == [expected] and len(expected) == 55
    await reader.read_pairs([(BY_USER, "later")])  # nothing else in flight: its own call
    assert store.calls[-1] == [("by_user", "later")] and await reader.ping()


async def test_batches_are_bounded():
    store = Store()
    reader = CoalescingReader(store)
    await asyncio.gather(*(reader.read_pairs([(BY_USER, f"u{i}"), (BY_PAGE, f"p{i}")]) for i in range(600)))
    assert [len(c) for c in store.calls] == [512, 512, 176]
    many = [(BY_USER, f"x{i}") for i in range(700)]  # one request over the bound still gets one call
    assert len(await reader.read_pairs(many)) == 700 and len(store.calls[-1]) == 700


async def test_failures_reach_every_waiter_and_a_timed_out_one_leaves_the_rest():
    store = Store(delay=0.05)
    reader = CoalescingReader(store)
    store.fail = ConnectionError("redis went away")
    outcomes = await asyncio.gather(
        *(reader.read_pairs([(BY_USER, f"u{i}")]) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    store.fail = None

    async def impatient() -> None:
        async with asyncio.timeout(0.01):
            await reader.read_pairs([(BY_USER, "slow")])

    patient = asyncio.ensure_future(reader.read_pairs([(BY_PAGE, "fine")]))
    with pytest.raises(TimeoutError):
        await impatient()
    assert names(await patient) == [("by_page", "fine")]
