"""Backfill: view versions behind their partition's live position replay the source topic up to it.

A new version of a view, or a new view over a source that is already consumed, starts at no position
while the partition's live position is further on: it replays the topic from its earliest retained
offset, folding the events from the view's declared ``backfill_start`` on when it has one. The
backfill reads those partitions with a second, group-less consumer (``assign``) from the version's
position, in chunks the processor's loop
interleaves with the live batches (one thread: no handover race), and folds them with the live code
(:meth:`features.folder.FeatureFolder.plan`), for the lagging versions only. Once a version's position
reaches the partition's live position, the next live batch simply includes it: the live fold takes
every version at the live position, and each folds only records after its own position.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from features.folder import FeatureFolder, PartitionBatch, SourcePlan, split_messages
from infra.deadletter import MemoryDeadLetters
from infra.settings import CommonSettings
from schemas.definitions import FeatureView

log = logging.getLogger(__name__)

Partition = tuple[str, int]


class Backfill:
    """The lagging (view version, partition) pairs of this worker and the consumer replaying them."""

    def __init__(self, settings: CommonSettings, folder: FeatureFolder, fetch_wait_ms: int = 100) -> None:
        self.settings = settings
        self.fetch_wait_ms = fetch_wait_ms
        self.folder = folder
        self.todo: dict[Partition, list[FeatureView]] = {}
        self._consumer: Consumer | None = None
        self._assigned: dict[Partition, int] = {}
        self._folded = 0
        self._logged = 0.0

    @property
    def active(self) -> bool:
        return bool(self.todo)

    def set(self, partition: Partition, views: Sequence[FeatureView]) -> None:
        """The versions of ``partition`` to bring up to its live position (none: nothing to do)."""
        if views:
            self.todo[partition] = list(views)
            source = f"{partition[0]}:{partition[1]}"
            log.info(
                "backfilling %s on %s from %s up to %s",
                ", ".join(v.ref for v in views), source,
                min(self.folder.position(v, source) for v in views), self.folder.live.get(source),
            )  # fmt: skip
        else:
            self.todo.pop(partition, None)
        self._reassign()

    def drop(self, partitions: Sequence[Partition]) -> None:
        """Forgets revoked partitions (their new owner backfills them)."""
        if any(self.todo.pop(p, None) is not None for p in partitions):
            self._reassign()

    def _reassign(self) -> None:
        """Follows ``todo`` incrementally: each lagging partition read from its lowest version's
        position + 1; a partition done or revoked is let go (the others keep their fetch position)."""
        wanted = {}
        for (topic, partition), views in self.todo.items():
            source = f"{topic}:{partition}"
            wanted[(topic, partition)] = min(self.folder.position(v, source) for v in views)
        gone = [p for p, o in self._assigned.items() if p not in wanted or wanted[p] < o]
        new = [p for p, o in wanted.items() if p not in self._assigned or o < self._assigned[p]]
        if not gone and not new:
            return
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    "bootstrap.servers": self.settings.kafka_bootstrap,
                    "group.id": "tide-reader-unused",  # required by librdkafka, never joined: we assign
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": self.fetch_wait_ms,
                }
            )
        if gone:
            self._consumer.incremental_unassign([TopicPartition(t, p) for t, p in gone])
            for p in gone:
                del self._assigned[p]
        if new:
            start = [(p, wanted[p]) for p in new]
            self._consumer.incremental_assign(
                [TopicPartition(t, p, o + 1 if o >= 0 else OFFSET_BEGINNING) for (t, p), o in start]
            )
            self._assigned.update(start)

    def step(
        self, plans: Mapping[str, SourcePlan], max_records: int, wait_s: float
    ) -> list[tuple[FeatureView, str, int, int]]:
        """Folds one chunk of the lagging partitions; returns the progress of every lagging version,
        ``(view, partition, position, live position)``. A version that reached the live position leaves
        the backfill (the live fold takes it from there)."""
        if not self.todo or self._consumer is None:
            return []
        msgs = self._consumer.consume(max_records, wait_s)
        # undecodable and poison records were dead-lettered when the live fold took their positions
        batches = split_messages(plans, msgs, MemoryDeadLetters(), int(time.time() * 1000))
        work = []
        for b in batches:
            by_start: dict[int | None, list[FeatureView]] = {}
            for view in self.todo.get((b.topic, b.partition), ()):
                by_start.setdefault(view.backfill_start_ms, []).append(view)
            for start, views in by_start.items():
                work += self.folder.plan(since(b, views[0].event_time, start), views, live=False)
        if work:
            self.folder.apply(work)
            self._folded += sum(len(p.records) for p in work)
        progress = []
        done = []
        for (topic, partition), views in self.todo.items():
            source = f"{topic}:{partition}"
            live = self.folder.live.get(source, -1)
            left = []
            for view in views:
                position = self.folder.position(view, source)
                if position < live and self._read_past(topic, partition, live):
                    self.folder.advance(view, source, live)
                    position = live
                progress.append((view, source, position, live))
                if position < live:
                    left.append(view)
            if left:
                self.todo[(topic, partition)] = left
            else:
                done.append((topic, partition))
        for p in done:
            log.info("backfill of %s:%s caught up with the live position", *p)
            del self.todo[p]
        if done:
            self._reassign()
        now = time.monotonic()
        if now - self._logged > 5 and self.todo:
            self._logged = now
            log.info(
                "backfill: %d records folded; %s", self._folded,
                ", ".join(f"{v.ref} {s} {pos}/{live}" for v, s, pos, live in progress if pos < live),
            )  # fmt: skip
        return progress

    def _read_past(self, topic: str, partition: int, live: int) -> bool:
        """Whether the backfill consumer has read beyond ``live`` (records up to it may be markers)."""
        if self._consumer is None:
            return False
        (tp,) = self._consumer.position([TopicPartition(topic, partition)])
        return tp.offset is not None and tp.offset > live + 1

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def since(b: PartitionBatch, event_time: str, start_ms: int | None) -> PartitionBatch:
    """``b`` without the events before ``start_ms`` (a view's declared backfill start; None: all of it).
    Their positions are taken all the same: they are never folded into that version."""
    if start_ms is None:
        return b
    return dataclasses.replace(b, records=[r for r in b.records if int(r.event[event_time]) >= start_ms])
