"""What a demo driver produces through and watches with: the outbox that batches its records to the
sources, and the probe of feature freshness (event time to visible in the online store)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from features.store import RedisOnlineStore
from infra.errors import ConfigError, StreamError
from infra.settings import CommonSettings
from schemas.definitions import Project

if TYPE_CHECKING:
    from tide.client import Client

log = logging.getLogger(__name__)


class Outbox:
    """Records queued by a driver and produced in batches through ``client.produce`` on one thread."""

    def __init__(self, client: Client, max_batch: int = 5000) -> None:
        self._client = client
        self._queue: queue.Queue[tuple[str, Mapping[str, Any]] | None] = queue.Queue()
        self._max = max_batch
        self.produced: dict[str, int] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-outbox", daemon=True)
        self._thread.start()

    def put(self, source: str, record: Mapping[str, Any]) -> None:
        self._raise()
        self._queue.put((source, record))

    def _raise(self) -> None:
        if self.error is not None:
            raise StreamError(f"producing to the sources failed: {self.error}") from self.error

    def _take(self) -> tuple[dict[str, list[Mapping[str, Any]]], int, bool]:
        """What is queued (waiting for the first), grouped by source in order, how many items were
        taken, and whether the outbox was closed."""
        batches: dict[str, list[Mapping[str, Any]]] = {}
        item = self._queue.get()
        taken = 1
        while item is not None:
            batches.setdefault(item[0], []).append(item[1])
            if taken >= self._max:
                return batches, taken, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batches, taken, False
            taken += 1
        return batches, taken, True

    def _run(self) -> None:
        closed = False
        while not closed:
            batches, taken, closed = self._take()
            for source, records in batches.items():
                try:
                    self._client.produce(source, records)
                except Exception as exc:  # the driver learns of it on its next put, flush or close
                    log.exception("producing %d records to %s failed", len(records), source)
                    self.error = exc
                    return
                self.produced[source] = self.produced.get(source, 0) + len(records)
            for _ in range(taken):
                self._queue.task_done()

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every record queued so far is acknowledged; raises if producing failed."""
        deadline = time.monotonic() + timeout_s
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StreamError(f"queued records not acknowledged in {timeout_s:.0f} s")
                done.wait(min(left, 0.1))
        self._raise()

    def close(self, timeout_s: float = 60.0) -> None:
        """Produce what is queued and stop; raises if anything failed."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise StreamError(f"the outbox did not drain in {timeout_s:.0f} s")
        self._raise()


class FreshnessProbe:
    """Event time to visible in the online store, for sampled events, polled on a thread of its own.

    Each poll reads every watched entity's row of each view in one store read; an event is visible once
    the entity's newest event time in the store has reached it.
    """

    def __init__(self, settings: CommonSettings, project: Project, timeout_s: float = 5.0) -> None:
        self._settings, self._project, self._timeout_ms = settings, project, timeout_s * 1000
        self._pending: list[tuple[str, str, int]] = []  # (view, entity, event time)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.freshness_ms: list[float] = []
        self.timed_out: list[str] = []
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._run()), name="demo-probe", daemon=True
        )
        self._thread.start()

    def watch(self, view: str, entity: str, event_ts: int) -> None:
        if view not in self._project.views:
            raise ConfigError(f"no feature view {view!r} (views: {', '.join(self._project.views)})")
        with self._lock:
            self._pending.append((view, entity, event_ts))

    async def _run(self) -> None:
        store = RedisOnlineStore.from_url(self._settings.redis_url, self._settings.topic_prefix)
        try:
            while not self._stop.is_set() or self._pending:
                with self._lock:
                    pending, self._pending = self._pending, []
                if pending:
                    await self._poll(store, pending)
                await asyncio.sleep(0.005)
        finally:
            await store.close()

    async def _poll(self, store: RedisOnlineStore, pending: list[tuple[str, str, int]]) -> None:
        by_view: dict[str, list[str]] = {}
        for view, entity, _ in pending:
            by_view.setdefault(view, []).append(entity)
        newest: dict[tuple[str, str], int | None] = {}
        for view, entities in by_view.items():
            rows = await store.read(self._project.views[view], sorted(set(entities)))
            newest.update({(view, r.entity): r.newest_event_ms for r in rows})
        now_ms = time.time() * 1000
        again = []
        for view, entity, ts in pending:
            seen = newest.get((view, entity))
            if seen is not None and seen >= ts:
                self.freshness_ms.append(now_ms - ts)
            elif now_ms - ts < self._timeout_ms:
                again.append((view, entity, ts))
            else:
                self.timed_out.append(f"{view}/{entity}@{ts}")
        with self._lock:
            self._pending[:0] = again

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self._timeout_ms / 1000 + 5)


def run_coroutine(coro: Any) -> None:
    """Run ``coro`` to the end, also from inside a running event loop (on a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
