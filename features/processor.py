"""The online feature processor: a faust-streaming agent per source topic that folds events into the
Redis tiles of every view declared on that source.

Events are read as raw bytes and decoded with the Avro codec, so a malformed record becomes a dead
letter (with the reason in its headers) instead of stopping the agent; so does an event later than its
view's allowed lateness. Each partition's batch is applied to Redis atomically together with its offset
and watermark (:mod:`features.store`), which makes restarts and rebalances exact whatever faust has
committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TP
from prometheus_client import Counter, Gauge, Histogram

from features import tiles
from features.definitions import VIEWS, FeatureView
from features.faust_transport import app_class
from features.settings import FeatureSettings
from features.store import RedisOnlineStore
from infra.metrics import serve_metrics
from schemas import codec
from streams.deadletter import DeadLetter, DeadLetterSink, KafkaDeadLetters
from streams.kafka import make_producer
from streams.topics import TOPICS, topic

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
LAG = Gauge(
    "tide_feature_consumer_lag", "Records behind the partition's high watermark", ["topic", "partition"]
)


@dataclass(frozen=True)
class SourceRecord:
    """One source record: its position, the decoded event and the raw bytes (for dead letters)."""

    offset: int
    event: dict[str, Any]
    key: bytes | None
    value: bytes


class FeatureFolder:
    """Folds the decoded events of one source partition into every view of that source.

    Per view it keeps the applied position and watermark of each partition (read from the store on first
    use). They are only a cache: the store's compare-and-set refuses a batch if another worker moved the
    position (a rebalance), and the retry re-reads it and skips what that worker already applied.
    """

    def __init__(self, store: RedisOnlineStore, views: Sequence[FeatureView], dlq: DeadLetterSink) -> None:
        self.store = store
        self.views = list(views)
        self.dlq = dlq
        self._state: dict[tuple[str, str], tuple[int, int]] = {}  # (view, source) -> (position, watermark)

    async def fold(self, topic_name: str, partition: int, records: Sequence[SourceRecord]) -> None:
        """Fold one partition's batch into every view (the views' writes run concurrently)."""
        await asyncio.gather(*(self._fold_view(view, topic_name, partition, records) for view in self.views))

    async def _fold_view(
        self, view: FeatureView, topic_name: str, partition: int, records: Sequence[SourceRecord]
    ) -> None:
        source = f"{topic_name}:{partition}"
        last = records[-1].offset
        started = time.perf_counter()
        key = (view.name, source)
        for _ in range(5):
            if key not in self._state:
                self._state[key] = await self.store.position(view, source)
            position, watermark = self._state[key]
            todo = [r for r in records if r.offset > position]
            if not todo:
                break
            on_time, late, new_watermark = tiles.split_late(
                view, [(r.offset, r.event) for r in todo], watermark
            )
            if await self.store.apply(view, source, [e for _, e in on_time], position, last, new_watermark):
                self._state[key] = (last, new_watermark)
                self._dead_letter_late(view, topic_name, partition, todo, late)
                self._observe(view, on_time)
                break
            del self._state[key]  # moved by another writer: re-read and skip what it applied
        WRITE_LATENCY.labels(view.name).observe(time.perf_counter() - started)

    def _dead_letter_late(
        self,
        view: FeatureView,
        topic_name: str,
        partition: int,
        todo: Sequence[SourceRecord],
        late: Sequence[tuple[int, Any, int]],
    ) -> None:
        if not late:
            return
        raw = {r.offset: r for r in todo}
        for offset, _, by_ms in late:
            r = raw[offset]
            reason = f"late by {by_ms} ms beyond the allowed lateness of {view.allowed_lateness_ms} ms"
            self.dlq.send(
                DeadLetter(
                    f"{STEP}.{view.name}", reason, "LateEvent", r.key, r.value, topic_name, partition, offset
                )
            )
        LATE.labels(view.name, "dead_letter").inc(len(late))

    def _observe(self, view: FeatureView, on_time: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
        EVENTS_IN.labels(view.name).inc(len(on_time))
        now = time.time()
        for _, event in on_time[-16:]:  # a sample per batch keeps the histogram cheap
            FRESHNESS.labels(view.name).observe(max(0.0, now - int(event[view.event_time]) / 1000))


def build_app(settings: FeatureSettings) -> faust.App:
    """A faust app with one agent per source topic, folding every view of that source."""
    app = app_class(settings.features_fetch_max_wait_ms)(
        settings.features_group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
        broker_heartbeat_interval=max(settings.kafka_session_timeout_ms / 6000, 0.5),
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        web_enabled=False,
        web_host="127.0.0.1",
        datadir=str(settings.state_dir / "faust"),
        store="memory://",
    )
    producer = make_producer(settings)
    dlq = KafkaDeadLetters(producer, topic(settings, "dead-letter"))
    by_source: dict[str, list[FeatureView]] = defaultdict(list)
    for view in VIEWS.values():
        by_source[view.source].append(view)

    for source_name, views in by_source.items():
        record = TOPICS[source_name].record
        source = app.topic(topic(settings, source_name), value_type=bytes, key_type=bytes)
        holder: dict[str, FeatureFolder] = {}

        async def agent(
            stream: Any, views: list[FeatureView] = views, record: str | None = record, holder: dict = holder
        ) -> None:
            if "folder" not in holder:  # created inside the worker's event loop
                store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
                holder["folder"] = FeatureFolder(store, views, dlq)
            folder: FeatureFolder = holder["folder"]
            async for batch in stream.take_events(
                settings.features_batch, within=settings.features_batch_ms / 1000
            ):
                by_partition: dict[tuple[str, int], list[SourceRecord]] = defaultdict(list)
                for ev in batch:
                    msg = ev.message
                    try:
                        event = codec.decode(msg.value, record)
                    except Exception as exc:
                        dlq.send(
                            DeadLetter(
                                STEP,
                                str(exc),
                                type(exc).__name__,
                                msg.key,
                                msg.value,
                                msg.topic,
                                msg.partition,
                                msg.offset,
                            )
                        )
                        continue
                    by_partition[(msg.topic, msg.partition)].append(
                        SourceRecord(msg.offset, event, msg.key, msg.value)
                    )
                await asyncio.gather(
                    *(folder.fold(t, p, records) for (t, p), records in by_partition.items())
                )
                for (topic_name, partition), records in by_partition.items():
                    LAG.labels(topic_name, str(partition)).set(
                        max(0, app.consumer.highwater(TP(topic_name, partition)) - records[-1].offset - 1)
                    )
                if len(producer):  # dead letters of this batch are delivered before it counts as done
                    producer.flush()

        app.agent(source, name=f"{STEP}.{source_name}")(agent)

    return app


def run(settings: FeatureSettings) -> None:
    """Run the processor until interrupted (the faust worker handles signals)."""
    serve_metrics(settings)
    app = build_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
