"""A small exactly-once processor loop on confluent-kafka, shared by the trainer, the drift scorer and
the judge.

Per batch: decode each record (undecodable ones become dead letters), hand it to the step (a step that
raises on a record sends that record to the dead letters and goes on), then let the step say whether to
checkpoint. A checkpoint commits the step's output, the dead letters and the consumed offsets in one
Kafka transaction: a crash replays from the last checkpoint and nothing is lost or produced twice.

With a :class:`Checkpointer` (``schemas.checkpoints.KafkaCheckpoints``), each checkpoint also produces a
record of the positions and, for a :class:`Stateful` step, its state, in the same transaction; at start
the step's state is restored from the newest one and partitions resume at its positions. A processor's
in-memory state (windows, detectors, armed alerts, joins) is then as durable as its output, and every
transaction carries a record whatever the broker does with transactions that hold only offsets.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from prometheus_client import Counter

from infra.deadletter import DeadLetter, DeadLetterSink
from infra.kafka import messages

log = logging.getLogger(__name__)

PROCESSED = Counter("tide_records_processed_total", "Records handled by a processor step", ["step"])


@dataclass(frozen=True)
class Incoming:
    """A decoded record with its origin."""

    record: str
    value: dict[str, Any]
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class Decoder(Protocol):
    """Decodes a payload into (record name, record); ``expected`` names the record the topic carries.
    (:func:`schemas.codec.decode_named` is the one services pass.)"""

    def __call__(self, data: bytes, expected: str | None) -> tuple[str, dict[str, Any]]: ...


class Step(Protocol):
    """One named stream step. ``handle`` may raise for one record; ``flush`` ends a batch and says
    whether to checkpoint (commit output and offsets) now."""

    name: str

    def handle(self, item: Incoming) -> None: ...

    def flush(self) -> bool: ...

    def idle(self) -> bool:
        """Called when a poll brought nothing; returns whether to checkpoint (e.g. time-based output)."""
        ...


@runtime_checkable
class Stateful(Protocol):
    """A step whose in-memory state is checkpointed with its output (see the module docstring)."""

    def snapshot(self) -> bytes:
        """The step's state, as of the end of the last batch handled."""
        ...

    def restore(self, state: bytes) -> None:
        """Take the state of a :meth:`snapshot` (called once, before the first record)."""
        ...


class Restored(Protocol):
    @property
    def state(self) -> bytes | None: ...


class Checkpointer(Protocol):
    """Where a processor's positions and state are kept (``schemas.checkpoints.KafkaCheckpoints``)."""

    def load(self) -> Restored | None: ...

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None: ...

    def write(self, consumer: Consumer, producer: Producer, state: bytes | None) -> None: ...


def decode_message(msg: Message, expected: str | None, decode: Decoder) -> Incoming:
    record, value = decode(msg.value() or b"", expected)
    _, ts = msg.timestamp()
    return Incoming(
        record=record,
        value=value,
        key=msg.key(),
        topic=msg.topic() or "",
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
        timestamp_ms=ts,
    )


def _dead_letter(step: str, msg: Message, exc: BaseException) -> DeadLetter:
    return DeadLetter(
        stage=step,
        error=str(exc) or type(exc).__name__,
        error_type=type(exc).__name__,
        key=msg.key(),
        value=msg.value(),
        source_topic=msg.topic() or "",
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
    )


def process_batch(
    step: Step, batch: list[Message], expected: dict[str, str | None], dlq: DeadLetterSink, decode: Decoder
) -> bool:
    """Handle one batch; return whether the step asks for a checkpoint (its ``flush``)."""
    accepted = 0
    for msg in batch:
        try:
            item = decode_message(msg, expected.get(msg.topic() or ""), decode)
            step.handle(item)
        except Exception as exc:  # any failure of one record is that record's, not the processor's
            dlq.send(_dead_letter(step.name, msg, exc))
            continue
        accepted += 1
    PROCESSED.labels(step.name).inc(accepted)
    return step.flush()


def run(
    step: Step,
    consumer: Consumer,
    producer: Producer,
    dlq: DeadLetterSink,
    expected: dict[str, str | None],
    stop: threading.Event,
    decode: Decoder,
    *,
    batch: int = 500,
    checkpoints: Checkpointer | None = None,
    min_interval_s: float = 0.0,
) -> None:
    """Run ``step`` over ``expected`` topics until ``stop`` is set, exactly once per checkpoint.

    ``producer`` must be transactional (``transactional.id`` set): what the step and the dead letters
    produce since the last checkpoint is committed in one Kafka transaction together with the consumed
    offsets (and, with ``checkpoints``, the positions and the step's state), so a crash either keeps all
    or none. A step checkpoints when its ``flush`` (or ``idle``) returns True, at most once per
    ``min_interval_s`` (a deferred checkpoint is taken at the next chance, or when stopping).
    """
    log.info("step %s consuming %s", step.name, sorted(expected))
    producer.init_transactions()  # fences a previous instance and aborts what it left open
    if checkpoints is not None:
        restored = checkpoints.load()
        if restored is not None and restored.state is not None and isinstance(step, Stateful):
            step.restore(restored.state)
    producer.begin_transaction()
    if checkpoints is not None:
        consumer.subscribe(list(expected), on_assign=checkpoints.on_assign)
    else:
        consumer.subscribe(list(expected))
    due = False
    last = 0.0
    try:
        for msgs in messages(consumer, batch=batch):
            due = (process_batch(step, msgs, expected, dlq, decode) if msgs else step.idle()) or due
            if due and time.monotonic() - last >= min_interval_s:
                checkpoint(consumer, producer, step, checkpoints)
                due, last = False, time.monotonic()
            if stop.is_set():
                break
        if due:
            checkpoint(consumer, producer, step, checkpoints)
    finally:
        producer.abort_transaction()
        consumer.close()
        log.info("step %s stopped", step.name)


def checkpoint(
    consumer: Consumer, producer: Producer, step: Step | None = None, checkpoints: Checkpointer | None = None
) -> None:
    """Commit what was produced and the consumed offsets (with ``checkpoints``: and a record of the
    positions and ``step``'s state) atomically, then open the next transaction."""
    if checkpoints is not None:
        state = step.snapshot() if isinstance(step, Stateful) else None
        checkpoints.write(consumer, producer, state)
    producer.send_offsets_to_transaction(
        consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
    )
    producer.commit_transaction()
    producer.begin_transaction()
