"""Kafka clients built from settings: the one place that knows client configuration."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from infra.errors import StreamError
from infra.settings import CommonSettings


def make_producer(settings: CommonSettings, **overrides: Any) -> Producer:
    """An idempotent, batching producer (acks=all): no duplicates from retries, no loss on broker failover."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "none",
    }
    config.update(overrides)
    return Producer(config)


def make_consumer(settings: CommonSettings, group_id: str, **overrides: Any) -> Consumer:
    """A group consumer that commits only what the caller has finished (at-least-once)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(settings.kafka_session_timeout_ms // 6, 500),
    }
    config.update(overrides)
    return Consumer(config)


def reader_from_beginning(
    settings: CommonSettings, topic: str, partitions: int, **overrides: Any
) -> Consumer:
    """A group-less consumer assigned to every partition of ``topic`` from offset 0."""
    return replay_reader(settings, {topic: partitions}, **overrides)


def replay_reader(settings: CommonSettings, topics: Mapping[str, int], **overrides: Any) -> Consumer:
    """A group-less consumer assigned to every partition of each topic (name -> partitions) from offset 0.

    Serving nodes use it to replay state topics (models, deployments): each node must see every record.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": "tide-reader-unused",  # required by librdkafka, never joined: we assign
        "enable.auto.commit": False,
    }
    config.update(overrides)
    consumer = Consumer(config)
    consumer.assign(
        [TopicPartition(name, p, OFFSET_BEGINNING) for name, count in topics.items() for p in range(count)]
    )
    return consumer


def read_to_end(
    settings: CommonSettings, topic: str, partitions: int, *, timeout_s: float = 30.0
) -> Iterator[Message]:
    """Every record of ``topic`` from the beginning up to its current end, then stop.

    The end is where each partition reports EOF, which the client derives from the high watermark in
    fetch responses, not from a listed end offset. A topic that does not exist yet has no records.
    Raises StreamError if the end is not reached within ``timeout_s``.
    """
    consumer = reader_from_beginning(settings, topic, partitions, **{"enable.partition.eof": True})
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(at_end) < partitions:
            if time.monotonic() > deadline:
                raise StreamError(f"{topic}: end not reached within {timeout_s:.0f} s")
            for msg in consumer.consume(500, 0.2):
                err = msg.error()
                if err is None:
                    yield msg
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
                elif err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                    return
                elif err.fatal():
                    raise StreamError(f"fatal error reading {topic}: {err}")
    finally:
        consumer.close()


def messages(consumer: Consumer, *, batch: int = 500, timeout: float = 0.2) -> Iterator[list[Message]]:
    """Yield batches of good messages; partition EOFs are skipped, fatal errors raise StreamError."""
    while True:
        good: list[Message] = []
        for msg in consumer.consume(batch, timeout):
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal():
                raise StreamError(f"fatal consumer error: {err}")
        yield good


def make_transactional_producer(
    settings: CommonSettings, transactional_id: str, **overrides: Any
) -> Producer:
    """A producer whose output is committed together with consumed offsets (exactly-once steps)."""
    return make_producer(settings, **{"transactional.id": transactional_id, **overrides})
