"""A small at-least-once processor loop on confluent-kafka, shared by the trainer and the drift scorer.

Per batch: decode each record (undecodable ones become dead letters), hand it to the step (a step that
raises on a record sends that record to the dead letters and goes on), then let the step say whether to
checkpoint. A checkpoint commits the step's output, the dead letters and the consumed offsets in one
Kafka transaction: a crash replays from the last checkpoint and nothing is lost or produced twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Consumer, Message, Producer
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
) -> int:
    """Handle one batch; return how many records the step accepted."""
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
) -> None:
    """Run ``step`` over ``expected`` topics until ``stop`` is set, exactly once per checkpoint.

    ``producer`` must be transactional (``transactional.id`` set): what the step and the dead letters
    produce since the last checkpoint is committed in one Kafka transaction together with the consumed
    offsets, so a crash either keeps both or neither. A step checkpoints when its ``flush`` returns True.
    """
    log.info("step %s consuming %s", step.name, sorted(expected))
    producer.init_transactions()
    producer.begin_transaction()
    consumer.subscribe(list(expected))
    try:
        for msgs in messages(consumer, batch=batch):
            if process_batch(step, msgs, expected, dlq, decode) if msgs else step.idle():
                checkpoint(consumer, producer)
            if stop.is_set():
                break
    finally:
        producer.abort_transaction()
        consumer.close()
        log.info("step %s stopped", step.name)


def checkpoint(consumer: Consumer, producer: Producer) -> None:
    """Commit what was produced and the consumed offsets atomically, then open the next transaction."""
    producer.send_offsets_to_transaction(
        consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
    )
    producer.commit_transaction()
    producer.begin_transaction()
