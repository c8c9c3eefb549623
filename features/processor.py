"""The online feature processor: a confluent-kafka group consumer that folds each batch of the project's
source topics into the Redis tiles of every view version declared on that source.

The views come from the registry, followed live (:class:`schemas.registry.Follower`, polled in the
loop): every source that some view version reads is consumed, labels sources included; a new source is
subscribed to, a new view or view version is backfilled then folded live, a removed view stops being
computed, within a second or so and without a restart. The versions computed are the project's
``view_versions`` minus the retired ones (:mod:`features.versions`).

Per batch (every record fetched when the processor is free, up to ``TIDE_FEATURES_BATCH``; see
:meth:`FeatureProcessor.take`): records are decoded with the Avro codec as their source's records and
checked by the source's admission rule (:mod:`features.admission`). A record that does not decode, or
that is poison, becomes a dead letter with the reason in its headers instead of stopping the processor,
and never moves its partition's watermark. The rest are grouped by partition, split into on-time and
late events per view version and folded into per-(entity, view version, tile) partials
(:mod:`features.folder`); then every partition's batch is applied in one Redis round trip, exactly once
per key (:mod:`features.store`). Late events go to the dead-letter topic with the view version and how
late they were.

The store's positions are the truth: on assignment each partition is sought to the furthest position
any of its view versions reached + 1; versions behind it are backfilled (:mod:`features.backfill`) in
chunks between live batches and join the live fold once caught up, then are marked live in the
view-state hash. Kafka's group offsets are only committed as a hint for lag tools. So restarts,
SIGKILLs and rebalances neither lose nor double-count, whatever Kafka committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from prometheus_client import Gauge

from features.backfill import Backfill
from features.folder import (
    STEP,
    FeatureFolder,
    InFlight,
    PartitionBatch,
    SourcePlan,
    SourceRecord,
    plan_sources,
    split_messages,
)
from features.settings import FeatureSettings
from features.store import RedisWriter
from features.versions import ModelLineage, StateWriter, ViewState, expire_view, read_states, retirable
from infra.console import stop_event
from infra.deadletter import KafkaDeadLetters
from infra.kafka import make_consumer, make_producer
from infra.metrics import serve_metrics
from infra.topics import topic as topic_name
from schemas import registry
from schemas.definitions import FeatureView, Project

log = logging.getLogger(__name__)

__all__ = [
    "FeatureFolder",
    "FeatureProcessor",
    "PartitionBatch",
    "SourcePlan",
    "SourceRecord",
    "plan_sources",
    "run",
    "split_messages",
]

LAG = Gauge(
    "tide_feature_consumer_lag", "Records behind the partition's high watermark", ["topic", "partition"]
)
HOUSEKEEPING_S = 0.5  # how often the registry, the models' lineage and the view states are looked at


class FeatureProcessor:
    """The consumer loop: one group member reading every source topic that has feature views.

    ``project``: the definitions to run (every kept view version, minus retired ones); ``follower``:
    the registry, polled for newer definitions (None: ``project`` stays as given).
    """

    def __init__(
        self,
        settings: FeatureSettings,
        project: Project,
        follower: registry.Follower | None = None,
    ) -> None:
        self.settings = settings
        self.follower = follower
        self.producer = make_producer(settings)
        self.dlq = KafkaDeadLetters(self.producer, topic_name(settings, "dead-letter"))
        self.writer = RedisWriter.from_url(settings.redis_url, settings.topic_prefix)
        self.states = StateWriter(self.writer.client, settings.topic_prefix)
        self.folder = FeatureFolder(self.writer, self.dlq)
        self.backfill = Backfill(settings, self.folder, settings.features_fetch_max_wait_ms)
        self.lineage: ModelLineage | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="redis-writer")
        self._flight: InFlight | None = None
        self._revocations = 0  # partitions revoked so far (see take)
        self._partitions: dict[str, int] = {}  # topic -> partitions
        self._live_refs: set[str] = set()  # view versions known to be live (no more reports)
        self._next_housekeeping = 0.0
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
        self.project = project
        self.views: list[FeatureView] = []
        self.sources: dict[str, SourcePlan] = {}
        self._plan(project)

    # --- what to compute ---------------------------------------------------------------------------------

    def _plan(self, project: Project) -> None:
        """Computes every kept, unretired view version of ``project``."""
        self.project = project
        states = read_states(self.writer.client, self.settings.topic_prefix)
        self.views = [v for ref, v in project.view_versions.items() if _state(states, ref) != "retired"]
        self._live_refs = {v.ref for v in self.views if _state(states, v.ref) == "live"}
        self.sources = plan_sources(self.settings, self.views)

    def _replan(self, project: Project) -> None:
        """Switches to ``project`` while running: new topics are subscribed to, new view versions
        backfilled, removed ones dropped."""
        self.drain()
        topics = set(self.sources)
        self._plan(project)
        log.info(
            "%s: now computing %s over %s", STEP, sorted(v.ref for v in self.views), sorted(self.sources)
        )
        if set(self.sources) != topics:
            self._subscribe()  # the rebalance's assignment finds what is behind
            return
        self._find_behind([(tp.topic, tp.partition) for tp in self.consumer.assignment()])

    def _subscribe(self) -> None:
        if self.sources:
            self.consumer.subscribe(list(self.sources), on_assign=self._on_assign, on_revoke=self._on_revoke)
        else:
            self.consumer.unsubscribe()

    def _find_behind(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Hands the view versions behind each partition's live position to the backfill."""
        for t, p in partitions:
            plan = self.sources.get(t)
            self.backfill.set((t, p), self.folder.behind(f"{t}:{p}", plan.views) if plan else [])
        self._report()

    # --- the group ---------------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Starts each assigned partition right after the furthest position of its view versions."""
        self.folder.forget([f"{tp.topic}:{tp.partition}" for tp in partitions])
        for tp in partitions:
            position = self.folder.start(f"{tp.topic}:{tp.partition}", self.sources[tp.topic].views)
            tp.offset = position + 1 if position >= 0 else OFFSET_BEGINNING
        log.info("assigned %s", ", ".join(f"{tp.topic}:{tp.partition}@{tp.offset}" for tp in partitions))
        consumer.assign(partitions)
        self._find_behind([(tp.topic, tp.partition) for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", ", ".join(f"{tp.topic}:{tp.partition}" for tp in partitions))
        self._revocations += 1
        self.drain()  # what was consumed from them is written before they go
        self.backfill.drop([(tp.topic, tp.partition) for tp in partitions])
        self.folder.forget([f"{tp.topic}:{tp.partition}" for tp in partitions])
        consumer.unassign()

    # --- the loop ----------------------------------------------------------------------------------------

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

    def housekeeping(self) -> None:
        """Newer definitions, view versions' states and retirements (every ``HOUSEKEEPING_S``)."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_S
        if self.follower is not None:
            found = self.follower.poll()
            if found is not None:
                log.info("%s: definitions version %d (%s)", STEP, found.version, found.digest[:12])
                self._replan(found.project)
        self._report()
        self._retire()

    def _report(self, progress: Sequence[tuple[FeatureView, str, int, int]] = ()) -> None:
        """Writes the progress of view versions not yet live on this worker's partitions."""
        assigned = [(tp.topic, tp.partition) for tp in self.consumer.assignment()]
        lagging = {(v.ref, s): (pos, live) for v, s, pos, live in progress}
        for view in self.views:
            if view.ref in self._live_refs:
                continue
            plan_topic = next((t for t, p in self.sources.items() if view in p.views), None)
            if plan_topic is None:
                continue
            mine: dict[str, tuple[int, int]] = {}
            for t, p in assigned:
                if t != plan_topic:
                    continue
                source = f"{t}:{p}"
                if (view.ref, source) in lagging:
                    mine[source] = lagging[(view.ref, source)]
                elif (t, p) not in self.backfill.todo or view not in self.backfill.todo[(t, p)]:
                    live = self.folder.live.get(source, -1)
                    mine[source] = (max(live, self._position(view, source)), live)
            if not mine:
                continue
            state = self.states.report(view, mine, self._partition_count(plan_topic))
            if state == "live":
                log.info("%s: view %s is live", STEP, view.ref)
                self._live_refs.add(view.ref)

    def _position(self, view: FeatureView, source: str) -> int:
        self.folder.load([(view, source)])
        return self.folder.position(view, source)

    def _partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
            count = len(meta.partitions) if meta is not None and meta.partitions else 1
            self._partitions[topic] = count
        return count

    def _retire(self) -> None:
        """Retires older view versions no model needs any more (see :func:`features.versions.retirable`)."""
        if not self.project.previous_views:
            return
        if self.lineage is None:
            self.lineage = ModelLineage(self.settings)
        self.lineage.poll()
        states = read_states(self.writer.client, self.settings.topic_prefix)
        gone = retirable(self.project, states, self.lineage.named)
        if not gone:
            return
        for view in gone:
            self.states.retire(view)
            grace = self.settings.features_retire_grace_ms
            n = expire_view(self.writer.client, view, self.settings.topic_prefix, grace)
            log.info("%s: view %s retired: its %d keys expire in %d ms", STEP, view.ref, n, grace)
        self._replan(self.project)

    def run(self, stop: threading.Event) -> None:
        log.info("%s computing %s over %s", STEP, sorted(v.ref for v in self.views), sorted(self.sources))
        if not self.sources:
            log.warning("%s: the project declares no feature views yet", STEP)
        self._subscribe()
        batch, wait = self.settings.features_batch, self.settings.features_batch_ms / 1000
        try:
            while not stop.is_set():
                backfilling = self.backfill.active
                msgs = self.take(batch, 0.001 if backfilling else wait) if self.sources else []
                if not self.sources:
                    stop.wait(wait)
                if msgs or self._flight is not None:
                    self.step(msgs)
                if backfilling:
                    progress = self.backfill.step(self.sources, batch, wait)
                    self._report(progress)
                self.housekeeping()
            self.drain()
        finally:
            self._close()

    def _close(self) -> None:
        self.consumer.close()  # leaves the group: the partitions move at once
        self.backfill.close()
        if self.lineage is not None:
            self.lineage.close()
        if self.follower is not None:
            self.follower.close()
        self._executor.shutdown()
        self.producer.flush(10)
        self.writer.close()
        log.info("%s stopped", STEP)


def _state(states: Mapping[str, ViewState], ref: str) -> str:
    found = states.get(ref)
    return found.state if found is not None else "backfilling"


def run(settings: FeatureSettings, project: Project | None = None) -> None:
    """Run the processor over every view version of ``project`` (default: the registry's newest
    definitions, followed live) until SIGTERM or SIGINT."""
    follower = None
    if project is None:
        follower = registry.Follower(settings)
        project = follower.current.project
    serve_metrics(settings)
    FeatureProcessor(settings, project, follower).run(stop_event())
