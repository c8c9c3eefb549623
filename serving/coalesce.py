"""Coalesced online-feature reads: the requests of one event-loop turn share one store round trip.

Under load many scoring requests are in flight at once, each wanting the features of a few
``(view, entity)`` pairs. Each separate read costs a Redis command's fixed client overhead (packing, a
pooled connection, parsing) and a script call on the server; :class:`CoalescingReader` gathers the
pairs asked for until the loop has run every ready callback, then reads them all in one
``read_pairs`` call (whatever their views, models and entities) and hands each request its rows.
Nothing waits for a timer: a lone request is read on the next loop turn, as it would have been; under
load the batch grows by itself (dynamic batching as Triton does for inference, applied to feature reads).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from features.store import FeatureRow
from schemas.definitions import FeatureView

Pair = tuple[FeatureView, str]


class FeatureStore(Protocol):
    async def read_pairs(self, pairs: Sequence[Pair]) -> list[FeatureRow]: ...

    async def ping(self) -> bool: ...


class CoalescingReader:
    """Wraps a store's ``read_pairs``; concurrent calls become one call of the store."""

    MAX_BATCH = 512  # distinct pairs per store call; more wait for the next

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._pending: list[tuple[Sequence[Pair], asyncio.Future[list[FeatureRow]]]] = []
        self._scheduled = False
        self._reads: set[asyncio.Task[None]] = set()  # running store calls (the loop keeps weak refs)

    async def ping(self) -> bool:
        return await self.store.ping()

    async def read_pairs(self, pairs: Sequence[Pair]) -> list[FeatureRow]:
        """The rows of ``pairs``, in order (read together with the pairs of concurrent calls)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[FeatureRow]] = loop.create_future()
        self._pending.append((pairs, future))
        if not self._scheduled:
            self._scheduled = True
            # call_soon runs after the callbacks already ready: every request that reached its read in
            # this turn of the loop joins the batch.
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        batch: list[tuple[Sequence[Pair], asyncio.Future[list[FeatureRow]]]] = []
        distinct: set[tuple[str, str]] = set()
        for waiter in pending:
            new = {(view.name, entity) for view, entity in waiter[0]} - distinct
            if batch and len(distinct) + len(new) > self.MAX_BATCH:
                self._start(batch)
                batch, distinct = [], {(view.name, entity) for view, entity in waiter[0]}
            else:
                distinct |= new
            batch.append(waiter)
        if batch:
            self._start(batch)

    def _start(self, waiters: list[tuple[Sequence[Pair], asyncio.Future[list[FeatureRow]]]]) -> None:
        task = asyncio.ensure_future(self._read(waiters))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _read(self, waiters: list[tuple[Sequence[Pair], asyncio.Future[list[FeatureRow]]]]) -> None:
        unique: dict[tuple[str, str], Pair] = {}
        for wanted, _ in waiters:
            for view, entity in wanted:
                unique.setdefault((view.name, entity), (view, entity))
        try:
            rows = await self.store.read_pairs(list(unique.values()))
        except BaseException as exc:  # every waiter sees the store's failure (or the cancellation)
            for _, future in waiters:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        found = dict(zip(unique, rows, strict=True))
        for wanted, future in waiters:
            if not future.done():  # a waiter that timed out has been cancelled
                future.set_result([found[(view.name, entity)] for view, entity in wanted])
