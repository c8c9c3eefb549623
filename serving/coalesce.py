"""Coalesced online-feature reads: the requests of one event-loop turn share one store round trip.

Under load many scoring requests are in flight at once, each wanting the features of one entity. Each
separate read costs a Redis command's fixed client overhead (packing, a pooled connection, parsing) and
a script call on the server; :class:`CoalescingReader` gathers the entities asked for until the loop has
run every ready callback, then reads them all in one call and hands each request its rows. Nothing
waits for a timer: a lone request is read on the next loop turn, as it would have been; under load the
batch grows by itself (dynamic batching as Triton does for inference, applied to feature reads).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from schemas.definitions import FeatureView
from features.store import FeatureRow


class FeatureStore(Protocol):
    async def read(self, view: FeatureView, entities: Sequence[str]) -> list[FeatureRow]: ...

    async def ping(self) -> bool: ...


class CoalescingReader:
    """Wraps a store's ``read``; concurrent calls for one view become one call of the store."""

    MAX_BATCH = 512  # entities per store call; more wait for the next

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._pending: dict[str, tuple[FeatureView, list[tuple[Sequence[str], asyncio.Future]]]] = {}
        self._scheduled = False
        self._reads: set[asyncio.Task[None]] = set()  # running store calls (the loop keeps weak refs)

    async def ping(self) -> bool:
        return await self.store.ping()

    async def read(self, view: FeatureView, entities: Sequence[str]) -> list[FeatureRow]:
        future: asyncio.Future[list[FeatureRow]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(view.name, (view, []))[1].append((entities, future))
        if not self._scheduled:
            self._scheduled = True
            # call_soon runs after the callbacks already ready: every request that reached its read in
            # this turn of the loop joins the batch.
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for view, waiters in pending.values():
            for start in range(0, len(waiters), self.MAX_BATCH):
                task = asyncio.ensure_future(self._read(view, waiters[start : start + self.MAX_BATCH]))
                self._reads.add(task)
                task.add_done_callback(self._reads.discard)

    async def _read(self, view: FeatureView, waiters: list[tuple[Sequence[str], asyncio.Future]]) -> None:
        entities = list(dict.fromkeys(e for wanted, _ in waiters for e in wanted))
        try:
            rows = await self.store.read(view, entities)
        except BaseException as exc:  # every waiter sees the store's failure (or the cancellation)
            for _, future in waiters:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        by_entity = {row.entity: row for row in rows}
        for wanted, future in waiters:
            if not future.done():  # a waiter that timed out has been cancelled
                future.set_result([by_entity[e] for e in wanted])
