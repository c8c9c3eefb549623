"""The online feature processor: a faust-streaming agent that folds events into Redis tiles.

Events are read as raw bytes and decoded with the Avro codec, so a malformed record becomes a dead
letter (with the reason in its headers) instead of stopping the agent. Each partition's batch is
applied to Redis atomically together with its offset (:mod:`features.store`), which makes restarts and
rebalances exact whatever faust has committed.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import faust
from prometheus_client import Counter, Histogram

from features.definitions import VIEWS, FeatureView
from features.faust_transport import app_class
from features.settings import FeatureSettings
from features.store import RedisOnlineStore
from infra.metrics import serve_metrics
from schemas import codec
from streams.deadletter import DeadLetter, KafkaDeadLetters
from streams.kafka import make_producer
from streams.topics import topic

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


class FeatureFolder:
    """Folds decoded events of one partition into the store, remembering the applied offsets."""

    def __init__(self, store: RedisOnlineStore, view: FeatureView) -> None:
        self.store = store
        self.view = view
        self._applied: dict[tuple[str, int], int] = {}

    async def fold(self, topic_name: str, partition: int, records: list[tuple[int, dict[str, Any]]]) -> None:
        key = (topic_name, partition)
        if key not in self._applied:
            self._applied[key] = await self.store.applied_offset(self.view, topic_name, partition)
        started = time.perf_counter()
        fresh = [e for o, e in records if o > self._applied[key]]
        # The cached offset is only a hint: the store's compare-and-set returns the real one when another
        # worker moved it (a rebalance), and the retry skips what that worker already applied.
        for _ in range(3):
            expected = self._applied[key]
            done = await self.store.apply(self.view, topic_name, partition, records, expected)
            self._applied[key] = done
            if done >= max(o for o, _ in records):
                break
        WRITE_LATENCY.labels(self.view.name).observe(time.perf_counter() - started)
        now = time.time()
        EVENTS_IN.labels(self.view.name).inc(len(fresh))
        for event in fresh[-16:]:  # a sample per batch keeps the histogram cheap
            FRESHNESS.labels(self.view.name).observe(max(0.0, now - event[self.view.event_time] / 1000))


def build_app(settings: FeatureSettings) -> faust.App:
    """A faust app with one agent per feature view."""
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
    store_holder: dict[str, RedisOnlineStore] = {}

    def get_store() -> RedisOnlineStore:
        # created inside the worker's event loop, on first use
        if "store" not in store_holder:
            store_holder["store"] = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        return store_holder["store"]

    for view in VIEWS.values():
        source = app.topic(topic(settings, view.source), value_type=bytes, key_type=bytes)
        folder_holder: dict[str, FeatureFolder] = {}

        async def agent(stream: Any, view: FeatureView = view, holder: dict = folder_holder) -> None:
            if "folder" not in holder:
                holder["folder"] = FeatureFolder(get_store(), view)
            folder: FeatureFolder = holder["folder"]
            async for batch in stream.take_events(
                settings.features_batch, within=settings.features_batch_ms / 1000
            ):
                by_partition: dict[tuple[str, int], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
                dead = 0
                for ev in batch:
                    msg = ev.message
                    try:
                        event = codec.decode(msg.value, "event")
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
                        dead += 1
                        continue
                    by_partition[(msg.topic, msg.partition)].append((msg.offset, event))
                for (topic_name, partition), records in by_partition.items():
                    await folder.fold(topic_name, partition, records)
                if dead:
                    producer.flush()
                else:
                    producer.poll(0)

        app.agent(source, name=f"{STEP}.{view.name}")(agent)

    return app


def run(settings: FeatureSettings) -> None:
    """Run the processor until interrupted (the faust worker handles signals)."""
    serve_metrics(settings)
    app = build_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
