"""The online feature processor: a confluent-kafka group consumer that folds each batch of the project's
source topics into the Redis tiles of every view declared on that source.

The views come from the registry (:func:`schemas.registry.load`, in :func:`run`): every source that
some view reads is consumed, labels sources included. Per batch (every record fetched when the
processor is free, up to ``TIDE_FEATURES_BATCH``; see :meth:`FeatureProcessor.take`): records are
decoded with the Avro codec as their source's records and checked by the source's admission rule
(:mod:`features.admission`). A record that does not decode, or that is poison (a field a view reads is
missing, null, of the wrong type, NaN or infinite, or its event time is further ahead of the wall clock
than the source's ``max_future_skew``) becomes a dead letter with the reason in its headers instead of
stopping the processor, and never moves its partition's watermark. The rest are grouped by partition,
split into on-time and late events per view and folded into
per-(entity, view, tile) partials in one pass (:func:`features.tiles.fold_partition`); then every
partition's batch is applied in one Redis round trip, each atomically with its position and watermark
(:mod:`features.store`). Late events go to the dead-letter topic with the view and how late they were.

The store's positions are the truth: on assignment each partition is sought to its stored position + 1,
and a batch whose expected position another worker moved (a rebalance) is refused, re-read and
redone without what that worker applied. Kafka's group offsets are only committed as a hint for lag
tools. So restarts, SIGKILLs and rebalances neither lose nor double-count, whatever Kafka committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from features import tiles
from features.admission import Admission
from features.settings import FeatureSettings
from features.store import RedisWriter, apply_command, apply_until_settled
from infra.console import stop_event
from infra.deadletter import DeadLetter, DeadLetterSink, KafkaDeadLetters
from infra.errors import StreamError
from infra.kafka import make_consumer, make_producer
from infra.metrics import serve_metrics
from infra.settings import CommonSettings
from infra.topics import prefixed, topic
from schemas import codec, registry
from schemas.definitions import FeatureView, Project, Source

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
LAG = Gauge(
    "tide_feature_consumer_lag", "Records behind the partition's high watermark", ["topic", "partition"]
)
FRESHNESS_SAMPLES = 16  # events per view and batch observed in the freshness histogram


@dataclass(frozen=True)
class SourcePlan:
    """One consumed topic: its source, the views that read it and the source's admission check."""

    source: Source
    topic: str
    views: list[FeatureView]
    admission: Admission


def plan_sources(settings: CommonSettings, views: Sequence[FeatureView]) -> dict[str, SourcePlan]:
    """The topics to consume (full names) for ``views``: one per source some view reads."""
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
    partition's watermark.
    """
    by_partition: dict[tuple[str, int], PartitionBatch] = {}
    for msg in msgs:
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise StreamError(f"fatal consumer error: {err}")
            continue
        name, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        plan = sources[name]
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
class InFlight:
    """Consumed batches whose writes may still be running (see :meth:`FeatureFolder.prepare`)."""

    batches: list[PartitionBatch]
    work: list[tuple[PartitionBatch, tiles.PartitionFold, tuple[list[str], list[Any]]]]
    future: Future[list[bool]] | None = None
    started: float = 0.0


class FeatureFolder:
    """Folds partition batches into every view of their source, all partitions in one Redis round trip.

    It caches each partition's applied position and watermark (read from the store when first needed).
    The cache is only a hint: the store's compare-and-set refuses a batch if another worker moved the
    position (a rebalance), and the retry re-reads it and skips what that worker already applied.
    """

    def __init__(self, writer: RedisWriter, dlq: DeadLetterSink) -> None:
        self.writer = writer
        self.dlq = dlq
        self._state: dict[str, tuple[int, int]] = {}  # source partition -> (position, watermark)

    def forget(self, sources: Sequence[str]) -> None:
        for source in sources:
            self._state.pop(source, None)

    def load(self, batches: Sequence[PartitionBatch]) -> None:
        """Reads the positions of the batches' partitions that are not cached."""
        missing = [b for b in batches if b.source not in self._state]
        if missing:
            found = self.writer.positions([(b.views[0], b.source) for b in missing])
            for b, state in zip(missing, found, strict=True):
                self._state[b.source] = state

    def position(self, source: str) -> int:
        return self._state[source][0]

    def fold(self, batches: Sequence[PartitionBatch]) -> None:
        """Applies every partition's batch; returns once each is applied (or was already)."""
        started = time.perf_counter()
        apply_until_settled([b for b in batches if b.last >= 0], self._attempt, "the processor")
        elapsed = time.perf_counter() - started
        for view in {v.name for b in batches for v in b.views}:
            WRITE_LATENCY.labels(view).observe(elapsed)

    def _attempt(self, todo: list[PartitionBatch]) -> list[PartitionBatch]:
        """One try at applying ``todo`` from the stored positions; returns the batches refused."""
        self.load(todo)
        work = []
        for b in todo:
            position, watermark = self._state[b.source]
            if b.last <= position:
                continue  # applied already (by this worker before a restart, or by another)
            folded = self._fold_partition(b, position, watermark)
            ns, wm = self.writer.namespace, folded.watermark
            command = apply_command(b.views, ns, b.source, folded.deltas, position, b.last, wm)
            work.append((b, folded, command))
        if not work:
            return []
        refused = []
        for (b, folded, _), applied in zip(work, self.writer.apply_all([c for _, _, c in work]), strict=True):
            if applied:
                self._state[b.source] = (b.last, folded.watermark)
                self._done(b, folded)
            else:
                del self._state[b.source]  # moved by another writer: re-read, skip what it applied
                refused.append(b)
        return refused

    def _fold_partition(self, b: PartitionBatch, position: int, watermark: int) -> tiles.PartitionFold:
        """The batch's records after ``position`` folded from ``watermark``. Admitted records fold
        (:mod:`features.admission`); should one still fail, it is found, dead-lettered and dropped
        from the batch, so no single record can stop the processor."""
        records = [(r.offset, r.event) for r in b.records if r.offset > position]
        try:
            return tiles.fold_partition(b.views, records, watermark)
        except Exception:
            log.exception("a batch of %s failed to fold; looking for the record at fault", b.source)
        bad = set()
        for r in b.records:
            try:
                tiles.fold_partition(b.views, [(r.offset, r.event)], tiles.NO_WATERMARK)
            except Exception as exc:
                bad.add(r.offset)
                reason = f"cannot be folded: {type(exc).__name__}: {exc}"
                letter = DeadLetter(
                    STEP, reason, type(exc).__name__, r.key, r.value, b.topic, b.partition, r.offset
                )
                self.dlq.send(letter)
        b.records = [r for r in b.records if r.offset not in bad]
        records = [(r.offset, r.event) for r in b.records if r.offset > position]
        return tiles.fold_partition(b.views, records, watermark)

    def prepare(self, batches: Sequence[PartitionBatch]) -> InFlight:
        """Folds the batches into apply commands, assuming every earlier batch gets applied (the cached
        positions move on at once). If one is refused instead, so is every later one of its partition,
        and :meth:`complete` redoes them from the stored position: the guess never costs exactness."""
        todo = [b for b in batches if b.last >= 0]
        self.load(todo)
        work = []
        for b in todo:
            position, watermark = self._state[b.source]
            if b.last <= position:
                continue
            folded = self._fold_partition(b, position, watermark)
            ns, wm = self.writer.namespace, folded.watermark
            work.append(
                (b, folded, apply_command(b.views, ns, b.source, folded.deltas, position, b.last, wm))
            )
            self._state[b.source] = (b.last, folded.watermark)
        return InFlight(list(batches), work)

    def send(self, flight: InFlight, executor: ThreadPoolExecutor) -> None:
        """Starts the flight's writes (one pipeline) on ``executor``'s thread."""
        flight.started = time.perf_counter()
        if flight.work:
            flight.future = executor.submit(self.writer.apply_all, [c for _, _, c in flight.work])

    def complete(self, flight: InFlight) -> None:
        """Waits for the flight's writes; redoes any refused batch from the stored position."""
        if flight.future is None:
            return
        results = flight.future.result()
        refused = []
        for (b, folded, _), applied in zip(flight.work, results, strict=True):
            if applied:
                self._done(b, folded)
            else:
                self._state.pop(b.source, None)  # moved by another writer: re-read, skip what it applied
                refused.append(b)
        if refused:
            self.fold(refused)
        elapsed = time.perf_counter() - flight.started
        for view in {v.name for b, _, _ in flight.work for v in b.views}:
            WRITE_LATENCY.labels(view).observe(elapsed)

    def _done(self, b: PartitionBatch, folded: tiles.PartitionFold) -> None:
        now = time.time()
        by_offset = {r.offset: r for r in b.records} if any(folded.late.values()) else {}
        for view in b.views:
            late = folded.late[view.name]
            if late:
                reason = "late by {} ms beyond the allowed lateness of " + f"{view.allowed_lateness_ms} ms"
                for offset, _, by_ms in late:
                    r = by_offset[offset]
                    self.dlq.send(
                        DeadLetter(
                            f"{STEP}.{view.name}",
                            reason.format(by_ms),
                            "LateEvent",
                            r.key,
                            r.value,
                            b.topic,
                            b.partition,
                            offset,
                        )
                    )
                LATE.labels(view.name, "dead_letter").inc(len(late))
            EVENTS_IN.labels(view.name).inc(folded.on_time[view.name])
            # a sample of the batch's newest on-time events keeps the histogram cheap
            skip = {offset for offset, _, _ in late}
            sampled = 0
            for r in reversed(b.records):
                if sampled == FRESHNESS_SAMPLES:
                    break
                if r.offset in skip:
                    continue
                sampled += 1
                FRESHNESS.labels(view.name).observe(max(0.0, now - int(r.event[view.event_time]) / 1000))


class FeatureProcessor:
    """The consumer loop: one group member reading every source topic that has feature views.

    ``views``: the views to keep (a project's, ``project.views.values()``); every source they read is
    consumed.
    """

    def __init__(self, settings: FeatureSettings, views: Sequence[FeatureView]) -> None:
        self.settings = settings
        self.sources = plan_sources(settings, views)  # topic -> its source, views and admission
        self.producer = make_producer(settings)
        self.dlq = KafkaDeadLetters(self.producer, topic(settings, "dead-letter"))
        self.writer = RedisWriter.from_url(settings.redis_url, settings.topic_prefix)
        self.folder = FeatureFolder(self.writer, self.dlq)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="redis-writer")
        self._flight: InFlight | None = None
        self._revocations = 0  # partitions revoked so far (see take)
        self.consumer: Consumer = make_consumer(
            settings,
            settings.features_group,
            **{
                # Kafka's offsets are a hint (the store's positions are the truth): stored after each
                # applied batch, committed in the background.
                "enable.auto.commit": True,
                "enable.auto.offset.store": False,
                "fetch.wait.max.ms": settings.features_fetch_max_wait_ms,
            },
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Starts each assigned partition right after its position in the store."""
        self.folder.forget([f"{tp.topic}:{tp.partition}" for tp in partitions])
        batches = [PartitionBatch(tp.topic, tp.partition, self.sources[tp.topic].views) for tp in partitions]
        self.folder.load(batches)
        for tp, b in zip(partitions, batches, strict=True):
            position = self.folder.position(b.source)
            tp.offset = position + 1 if position >= 0 else OFFSET_BEGINNING
        log.info("assigned %s", ", ".join(f"{tp.topic}:{tp.partition}@{tp.offset}" for tp in partitions))
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", ", ".join(f"{tp.topic}:{tp.partition}" for tp in partitions))
        self._revocations += 1
        self.drain()  # what was consumed from them is written before they go
        self.folder.forget([f"{tp.topic}:{tp.partition}" for tp in partitions])
        consumer.unassign()

    def split(self, msgs: Sequence[Message]) -> list[PartitionBatch]:
        """Decodes a consumed batch into per-partition batches (see :func:`split_messages`)."""
        return split_messages(self.sources, msgs, self.dlq, int(time.time() * 1000))

    def step(self, msgs: Sequence[Message]) -> None:
        """Folds one consumed batch and starts its writes; finishes the previous batch's meanwhile, so
        the processor folds batch N+1 while Redis applies batch N."""
        flight = self.folder.prepare(self.split(msgs)) if msgs else None
        self.drain()
        if flight is not None and flight.batches:
            self.folder.send(flight, self._executor)
            self._flight = flight

    def drain(self) -> None:
        """Completes the batch in flight: its writes, its dead letters, then its offsets (a hint)."""
        flight, self._flight = self._flight, None
        if flight is None:
            return
        self.folder.complete(flight)
        if len(self.producer):  # this batch's dead letters are delivered before it counts as done
            self.producer.flush()
        done = [TopicPartition(b.topic, b.partition, b.last + 1) for b in flight.batches]
        self.consumer.store_offsets(offsets=done)
        for tp in done:
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high is not None and high >= 0:
                LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    def take(self, batch: int, wait: float) -> list[Message]:
        """The next batch: every record already fetched, up to ``batch``, as soon as there is one.

        ``consume(n, timeout)`` alone would hold records it has until ``n`` arrive or ``timeout`` passes,
        adding up to the timeout to every event's freshness when the processor keeps up. Waiting for the
        first record only, then taking what else is queued without waiting, adapts the batch to the
        load: small batches (low latency) when caught up, full ones (throughput) when behind, since
        what arrives while a batch is folded and written is the next batch.
        """
        first = self.consumer.consume(1, wait)
        if not first or batch == 1:
            return first
        revocations = self._revocations
        msgs = first + self.consumer.consume(batch - 1, 0)
        if self._revocations != revocations:
            # a rebalance ran inside the second call: records of partitions no longer ours are dropped
            # (their new owner reads them from the stored position; their offsets cannot be stored here)
            owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
            msgs = [m for m in msgs if m.error() is not None or (m.topic(), m.partition()) in owned]
        return msgs

    def run(self, stop: threading.Event) -> None:
        if not self.sources:
            log.warning("%s: the project declares no feature views; nothing to do", STEP)
            stop.wait()
            self._close()
            return
        views = [v.name for p in self.sources.values() for v in p.views]
        log.info("%s consuming %s for views %s", STEP, sorted(self.sources), views)
        self.consumer.subscribe(list(self.sources), on_assign=self._on_assign, on_revoke=self._on_revoke)
        batch, wait = self.settings.features_batch, self.settings.features_batch_ms / 1000
        try:
            while not stop.is_set():
                msgs = self.take(batch, wait)
                if msgs or self._flight is not None:
                    self.step(msgs)
            self.drain()
        finally:
            self._close()

    def _close(self) -> None:
        self.consumer.close()  # leaves the group: the partitions move at once
        self._executor.shutdown()
        self.producer.flush(10)
        self.writer.close()
        log.info("%s stopped", STEP)


def run(settings: FeatureSettings, project: Project | None = None) -> None:
    """Run the processor over every view of ``project`` (default: the registry's newest definitions)
    until SIGTERM or SIGINT."""
    if project is None:
        project = registry.load(settings).project
    serve_metrics(settings)
    FeatureProcessor(settings, list(project.views.values())).run(stop_event())
