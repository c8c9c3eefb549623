"""Kafka clients built from settings: the one place that knows client configuration."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

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
    """A group-less consumer assigned to every partition of ``topic`` from offset 0.

    Serving nodes use it to replay state topics (models, deployments): each node must see every record.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": "tide-reader-unused",  # required by librdkafka, never joined: we assign
        "enable.auto.commit": False,
    }
    config.update(overrides)
    consumer = Consumer(config)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    return consumer


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


def delivery_error_raiser(err: Any, msg: Message) -> None:
    """Delivery callback for producers whose every record must land."""
    if err is not None:
        raise StreamError(f"delivery to {msg.topic()} failed: {err}")


def make_transactional_producer(
    settings: CommonSettings, transactional_id: str, **overrides: Any
) -> Producer:
    """A producer whose output is committed together with consumed offsets (exactly-once steps)."""
    return make_producer(settings, **{"transactional.id": transactional_id, **overrides})
