"""A stream processor's positions and state, kept on the ``checkpoints`` topic with its output.

Every checkpoint of a processor run by :func:`infra.processor.run` produces one ``checkpoint`` record
(keyed by the processor's id, its transactional id) into the same Kafka transaction as the step's output
and dead letters: the next offset of every partition it consumed and, for a step that has state, the
step's :meth:`snapshot` (zlib-compressed). Output, positions and state therefore commit together or not at
all, and every transaction carries a record — a broker that ignores a transaction holding only consumed
offsets (the embedded one does) still moves on.

At start the processor reads the topic to its end and takes its own newest record: the step restores its
state from it, and each partition it is assigned resumes at the recorded position (overriding the group's
committed offset, which a correct broker keeps equal). The group offsets are still committed in each
transaction, so lag monitoring works as usual.

The topic is compacted (newest per key wins); readers still fold every record in order, as the embedded
broker never compacts.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer, TopicPartition

from infra.kafka import read_to_end, reader_from_beginning
from infra.settings import CommonSettings
from infra.topics import TOPICS, topic
from schemas import codec
from schemas.records import Checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """What a processor's newest checkpoint holds."""

    positions: dict[tuple[str, int], int]
    state: bytes | None
    ts: int


class KafkaCheckpoints:
    """The checkpoints of one processor (``processor``: its id) on the ``checkpoints`` topic.

    Implements :class:`infra.processor.Checkpointer`.
    """

    def __init__(self, settings: CommonSettings, processor: str) -> None:
        self._settings = settings
        self.processor = processor
        self._topic = topic(settings, "checkpoints")
        self._positions: dict[tuple[str, int], int] = {}

    def load(self, *, timeout_s: float = 30.0) -> Restored | None:
        """The processor's newest checkpoint, or None when it has none; its positions are kept for
        :meth:`on_assign`."""
        newest: Checkpoint | None = None
        key = self.processor.encode()
        for msg in read_to_end(
            self._settings, self._topic, TOPICS["checkpoints"].partitions, timeout_s=timeout_s
        ):
            if msg.key() == key:
                newest = codec.decode(msg.value() or b"", "checkpoint")  # type: ignore[assignment]
        if newest is None:
            return None
        self._positions = {(p["topic"], p["partition"]): p["offset"] for p in newest["positions"]}
        state = newest["state"]
        restored = Restored(dict(self._positions), zlib.decompress(state) if state else None, newest["ts"])
        log.info(
            "processor %s resumes from its checkpoint of %d ms ago (%d partitions, state %d bytes)",
            self.processor,
            int(time.time() * 1000) - restored.ts,
            len(restored.positions),
            len(restored.state or b""),
        )
        return restored

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Rebalance callback: assigned partitions resume at the checkpointed positions."""
        for tp in partitions:
            position = self._positions.get((tp.topic, tp.partition))
            if position is not None:
                tp.offset = position
        consumer.assign(partitions)

    def write(self, consumer: Consumer, producer: Producer, state: bytes | None) -> None:
        """Produce a checkpoint of ``consumer``'s positions and ``state`` into the open transaction."""
        for tp in consumer.position(consumer.assignment()):
            if tp.offset >= 0:
                self._positions[tp.topic, tp.partition] = tp.offset
        record: Checkpoint = {
            "processor": self.processor,
            "positions": [
                {"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(self._positions.items())
            ],
            "state": zlib.compress(state, 1) if state is not None else None,
            "ts": int(time.time() * 1000),
        }
        producer.produce(self._topic, value=codec.encode("checkpoint", record), key=self.processor.encode())


class PositionWatch:
    """The newest positions of every processor that checkpoints on the ``checkpoints`` topic, read as
    they are committed (one reader from the beginning, kept open): processor id -> (topic, partition) ->
    the next offset it will read. Whoever wants to know whether the processors have caught up with an
    input compares them with its high watermarks (:func:`tide.demo.wait_until_read`)."""

    def __init__(self, settings: CommonSettings) -> None:
        self._consumer = reader_from_beginning(
            settings, topic(settings, "checkpoints"), TOPICS["checkpoints"].partitions
        )
        self.positions: dict[str, dict[tuple[str, int], int]] = {}

    def poll(self, timeout_s: float = 0.5) -> None:
        """Fold in what was committed since the last call (waits at most ``timeout_s`` for it)."""
        while msgs := self._consumer.consume(500, timeout_s):
            for msg in msgs:
                if msg.error() is not None:
                    continue
                record = codec.decode(msg.value() or b"", "checkpoint")
                self.positions[record["processor"]] = {
                    (p["topic"], p["partition"]): p["offset"] for p in record["positions"]
                }
            timeout_s = 0.0

    def behind(self, topics: Mapping[str, int]) -> dict[str, int]:
        """Records each processor has still to read of ``topics`` (full name -> partitions) up to their
        high watermarks now, counting only the topics it has read from (a processor that reads none of
        them is left out)."""
        ends = {}
        for name, partitions in topics.items():
            for p in range(partitions):
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(name, p), timeout=5.0)
                ends[name, p] = high
        out = {}
        for processor, positions in self.positions.items():
            mine = {t for t, _ in positions} & set(topics)
            out[processor] = sum(
                max(0, high - positions.get((t, p), 0)) for (t, p), high in ends.items() if t in mine
            )
        return out

    def close(self) -> None:
        self._consumer.close()
