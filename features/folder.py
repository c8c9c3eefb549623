"""Folding partition batches into the online store, per view version, exactly once per key.

A consumed batch is decoded and admitted per partition (:func:`split_messages`), then folded for every
view version of its source that sits at the partition's live position (:meth:`FeatureFolder.prepare`);
view versions that share a stored position and watermark are folded together in one pass. A version
behind the live position (a new version, or a new view over an old source) is left to the backfill
(:mod:`features.backfill`), which folds it with the same code (:meth:`FeatureFolder.plan`) from its own
position until it reaches the live one and joins the live fold.

Every write goes through :meth:`features.store.RedisWriter.apply`; a key another writer applied part of
the batch to (a restart, a rebalance) is refolded from its records after the key's stored position and
written again (:meth:`FeatureFolder.settle`), so nothing is lost or counted twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Message
from prometheus_client import Counter, Histogram

from features import tiles
from features.admission import Admission
from features.store import Conflict, RedisWriter, ViewBatch, apply_until_settled, refold
from infra.deadletter import DeadLetter, DeadLetterSink
from infra.errors import StreamError
from infra.settings import CommonSettings
from infra.topics import prefixed
from schemas import codec
from schemas.definitions import FeatureView, Source

log = logging.getLogger(__name__)

STEP = "features"
EVENTS_IN = Counter("tide_feature_events_total", "Events folded into the online store", ["view"])
FRESHNESS = Histogram(
    "tide_feature_freshness_seconds",
    "Event time to visible in Redis",
    ["view"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WRITE_LATENCY = Histogram("tide_feature_redis_write_seconds", "Redis batch write latency", ["view"])
LATE = Counter("tide_feature_late_events_total", "Events later than the allowed lateness", ["view", "fate"])
REJECTED = Counter(
    "tide_feature_rejected_records_total",
    "Source records dead-lettered before folding (undecodable or poison), by reason",
    ["source", "reason"],
)
FRESHNESS_SAMPLES = 16  # events per view and batch observed in the freshness histogram


@dataclass(frozen=True)
class SourcePlan:
    """One consumed topic: its source, the view versions that read it and the source's admission."""

    source: Source
    topic: str
    views: list[FeatureView]
    admission: Admission


def plan_sources(settings: CommonSettings, views: Sequence[FeatureView]) -> dict[str, SourcePlan]:
    """The topics to consume (full names) for ``views`` (view versions): one per source some reads."""
    by_source: dict[str, list[FeatureView]] = {}
    for view in views:
        by_source.setdefault(view.source_name, []).append(view)
    plans = {}
    for group in by_source.values():
        source = group[0].source
        name = prefixed(settings, source.topic_name)
        plans[name] = SourcePlan(source, name, group, Admission.of_source(group))
    return plans


@dataclass(frozen=True)
class SourceRecord:
    """One source record: its position, the decoded event and the raw bytes (for dead letters)."""

    offset: int
    event: dict[str, Any]
    key: bytes | None
    value: bytes


@dataclass
class PartitionBatch:
    """One partition's share of a consumed batch: its decoded records and its last offset (undecodable
    records included: they are dead letters, and their positions are taken)."""

    topic: str
    partition: int
    views: list[FeatureView]
    records: list[SourceRecord] = field(default_factory=list)
    last: int = -1

    @property
    def source(self) -> str:
        return f"{self.topic}:{self.partition}"


def split_messages(
    sources: Mapping[str, SourcePlan], msgs: Sequence[Message], dlq: DeadLetterSink, now_ms: int
) -> list[PartitionBatch]:
    """Decodes consumed records into per-partition batches, each as a record of its topic's source.

    Undecodable and poison records (:mod:`features.admission`, with ``now_ms`` as the wall clock) are
    sent to ``dlq`` with the reason: their positions are taken, their event times never reach the
    partition's watermark. Records of topics no longer planned are dropped.
    """
    by_partition: dict[tuple[str, int], PartitionBatch] = {}
    for msg in msgs:
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise StreamError(f"fatal consumer error: {err}")
            continue
        name, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        plan = sources.get(name)
        if plan is None:
            continue
        b = by_partition.get((name, partition))
        if b is None:
            b = by_partition[(name, partition)] = PartitionBatch(name, partition, plan.views)
        b.last = offset
        value = msg.value() or b""
        try:
            event = codec.decode(value, plan.source.name)
        except Exception as exc:  # a bad record is data: it goes to the dead letters
            error_type, reason = type(exc).__name__, str(exc) or type(exc).__name__
        else:
            rejection = plan.admission.check(event, now_ms)
            if rejection is None:
                b.records.append(SourceRecord(offset, event, msg.key(), value))
                continue
            error_type, reason = rejection.error_type, rejection.reason
        REJECTED.labels(plan.source.name, error_type).inc()
        dlq.send(DeadLetter(STEP, reason, error_type, msg.key(), value, name, partition, offset))
    return list(by_partition.values())


@dataclass
class Planned:
    """One fold of a partition batch for view versions that shared a position and watermark: the
    records and watermark it started from (a conflict refolds from them) and what it writes."""

    batch: PartitionBatch
    fold: tiles.PartitionFold
    records: list[tuple[int, Any]]
    watermark: int
    writes: list[ViewBatch]
    live: bool = True  # observed in the freshness metrics (a backfill is not)


@dataclass
class InFlight:
    """Consumed batches whose writes may still be running (see :meth:`FeatureFolder.prepare`)."""

    batches: list[PartitionBatch]
    work: list[Planned]
    future: Future[list[Conflict]] | None = None
    started: float = 0.0


class FeatureFolder:
    """Folds partition batches into view versions and writes them, all partitions in one round trip.

    It caches each (view version, partition)'s applied position and watermark (read from the store when
    first needed) and each partition's live position: what the live consumer has consumed up to. The
    cache is only a hint: a key another writer moved is refolded from its own stored position.
    """

    def __init__(self, writer: RedisWriter, dlq: DeadLetterSink) -> None:
        self.writer = writer
        self.dlq = dlq
        self._state: dict[tuple[str, str], tuple[int, int]] = {}  # (view ref, partition) -> (pos, wm)
        self.live: dict[str, int] = {}  # partition -> live position

    def forget(self, sources: Sequence[str]) -> None:
        gone = set(sources)
        self._state = {k: v for k, v in self._state.items() if k[1] not in gone}
        for source in gone:
            self.live.pop(source, None)

    def load(self, pairs: Sequence[tuple[FeatureView, str]]) -> None:
        """Reads the positions of the (view version, partition) pairs that are not cached."""
        missing = list({(v.ref, s): (v, s) for v, s in pairs if (v.ref, s) not in self._state}.values())
        if missing:
            for (view, source), state in zip(missing, self.writer.positions_of(missing), strict=True):
                self._state[(view.ref, source)] = state

    def state(self, view: FeatureView, source: str) -> tuple[int, int]:
        return self._state[(view.ref, source)]

    def position(self, view: FeatureView, source: str) -> int:
        return self._state[(view.ref, source)][0]

    def start(self, source: str, views: Sequence[FeatureView]) -> int:
        """The partition's live position at assignment: the furthest any of its view versions got."""
        self.load([(v, source) for v in views])
        live = max((self.position(v, source) for v in views), default=-1)
        self.live[source] = live
        return live

    def behind(self, source: str, views: Sequence[FeatureView]) -> list[FeatureView]:
        """The view versions of ``views`` behind the partition's live position (to backfill)."""
        self.load([(v, source) for v in views])
        live = self.live.get(source, -1)
        return [v for v in views if self.position(v, source) < live]

    def plan(self, b: PartitionBatch, views: Sequence[FeatureView], *, live: bool = True) -> list[Planned]:
        """Folds ``b`` for each of ``views`` from its own cached position (records after it), versions
        that share a position and watermark in one pass, and moves the cached positions on at once
        (assuming the writes succeed: if one does not, the caller fails rather than going on)."""
        self.load([(v, b.source) for v in views])
        groups: dict[tuple[int, int], list[FeatureView]] = {}
        for view in views:
            state = self._state[(view.ref, b.source)]
            if state[0] < b.last:
                groups.setdefault(state, []).append(view)
        out = []
        for (position, watermark), group in groups.items():
            records, folded = self._fold_partition(b, group, position, watermark)
            writes = [ViewBatch(v, b.source, folded.deltas[v.ref], b.last, folded.watermark) for v in group]
            for view in group:
                self._state[(view.ref, b.source)] = (b.last, folded.watermark)
            out.append(Planned(b, folded, records, watermark, writes, live))
        return out

    def _fold_partition(
        self, b: PartitionBatch, views: Sequence[FeatureView], position: int, watermark: int
    ) -> tuple[list[tuple[int, Any]], tiles.PartitionFold]:
        """The batch's records after ``position`` folded from ``watermark``. Admitted records fold
        (:mod:`features.admission`); should one still fail, it is found, dead-lettered and dropped
        from the batch, so no single record can stop the processor."""
        records = [(r.offset, r.event) for r in b.records if r.offset > position]
        try:
            return records, tiles.fold_partition(views, records, watermark)
        except Exception:
            log.exception("a batch of %s failed to fold; looking for the record at fault", b.source)
        bad = set()
        for r in b.records:
            try:
                tiles.fold_partition(views, [(r.offset, r.event)], tiles.NO_WATERMARK)
            except Exception as exc:
                bad.add(r.offset)
                reason = f"cannot be folded: {type(exc).__name__}: {exc}"
                letter = DeadLetter(
                    STEP, reason, type(exc).__name__, r.key, r.value, b.topic, b.partition, r.offset
                )
                self.dlq.send(letter)
        b.records = [r for r in b.records if r.offset not in bad]
        records = [(r.offset, r.event) for r in b.records if r.offset > position]
        return records, tiles.fold_partition(views, records, watermark)

    def prepare(self, batches: Sequence[PartitionBatch]) -> InFlight:
        """Folds the batches for every view version at its partition's live position (versions behind
        it are the backfill's), assuming every earlier batch gets applied."""
        work = []
        for b in batches:
            if b.last < 0:
                continue
            self.load([(v, b.source) for v in b.views])
            live = self.live.get(b.source, -1)
            views = [v for v in b.views if self._state[(v.ref, b.source)][0] >= live]
            work += self.plan(b, views)
            self.live[b.source] = max(live, b.last)
        return InFlight(list(batches), work)

    def send(self, flight: InFlight, executor: ThreadPoolExecutor) -> None:
        """Starts the flight's writes (one pipeline) on ``executor``'s thread."""
        flight.started = time.perf_counter()
        if flight.work:
            writes = [w for p in flight.work for w in p.writes]
            flight.future = executor.submit(self.writer.apply, writes)

    def complete(self, flight: InFlight) -> None:
        """Waits for the flight's writes; refolds and rewrites any key another writer moved."""
        if flight.future is None:
            return
        self.settle(flight.work, flight.future.result())
        elapsed = time.perf_counter() - flight.started
        for ref in {v.view.ref for p in flight.work for v in p.writes}:
            WRITE_LATENCY.labels(ref).observe(elapsed)

    def apply(self, work: Sequence[Planned]) -> None:
        """Writes ``work`` now (the backfill's path), settling any conflict."""
        self.settle(work, self.writer.apply([w for p in work for w in p.writes]))

    def settle(self, work: Sequence[Planned], conflicts: Sequence[Conflict]) -> None:
        """Redoes the conflicted keys of ``work`` (refolded from their records after each key's stored
        position) until none is left, then accounts for the work done."""
        writes = [(p, w) for p in work for w in p.writes]

        def attempt(todo: list[tuple[Planned, ViewBatch, list[Conflict]]]) -> list[Any]:
            redo = [(p, refold(w, cs, p.records, p.watermark), cs) for p, w, cs in todo]
            left = self.writer.apply([w for _, w, _ in redo])
            by_batch: dict[int, list[Conflict]] = {}
            for c in left:
                by_batch.setdefault(c.batch, []).append(c)
            return [(redo[i][0], redo[i][1], cs) for i, cs in by_batch.items()]

        if conflicts:
            by_write: dict[int, list[Conflict]] = {}
            for c in conflicts:
                by_write.setdefault(c.batch, []).append(c)
            log.info("%d keys were applied in part by another writer; refolding them", len(conflicts))
            todo = [(writes[i][0], writes[i][1], cs) for i, cs in by_write.items()]
            apply_until_settled(todo, attempt, "the processor")
        for p in work:
            self._done(p)

    def _done(self, p: Planned) -> None:
        b, folded = p.batch, p.fold
        now = time.time()
        by_offset = {r.offset: r for r in b.records} if any(folded.late.values()) else {}
        for write in p.writes:
            view = write.view
            late = folded.late[view.ref]
            if late:
                reason = "late by {} ms beyond the allowed lateness of " + f"{view.allowed_lateness_ms} ms"
                for offset, _, by_ms in late:
                    r = by_offset[offset]
                    self.dlq.send(
                        DeadLetter(
                            f"{STEP}.{view.ref}",
                            reason.format(by_ms),
                            "LateEvent",
                            r.key,
                            r.value,
                            b.topic,
                            b.partition,
                            offset,
                        )
                    )
                LATE.labels(view.ref, "dead_letter").inc(len(late))
            EVENTS_IN.labels(view.ref).inc(folded.on_time[view.ref])
            if not p.live or not p.records:
                continue
            # a sample of the batch's newest on-time events keeps the histogram cheap
            skip = {offset for offset, _, _ in late}
            first, sampled = p.records[0][0], 0
            for r in reversed(b.records):
                if sampled == FRESHNESS_SAMPLES or r.offset < first:
                    break
                if r.offset in skip:
                    continue
                sampled += 1
                FRESHNESS.labels(view.ref).observe(max(0.0, now - int(r.event[view.event_time]) / 1000))

    def advance(self, view: FeatureView, source: str, position: int) -> None:
        """Moves a view version's position of ``source`` to ``position`` with nothing to fold (the
        records up to it are not data: transaction markers, compacted away)."""
        _, watermark = self._state[(view.ref, source)]
        self.writer.apply([ViewBatch(view, source, {}, position, watermark)])
        self._state[(view.ref, source)] = (position, watermark)
