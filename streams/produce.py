"""Producing events and labels: from the built-in generator or a JSONL file.

Every record is validated against its Avro schema before it is sent; an invalid one is rejected with
the reason (and its line number for files), never half-sent. The producer is idempotent and flushed
before returning, so what was reported as produced is in the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infra.errors import SchemaError, StreamError
from infra.settings import CommonSettings
from schemas import codec
from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator
from infra.kafka import make_producer
from infra.topics import topic

log = logging.getLogger(__name__)


class EventProducer:
    """Sends events and labels, keyed by card so one card's records stay in order on one partition.

    ``validate=False`` skips the schema check on encode, for trusted (generated) records only.
    ``last_offset`` holds the highest delivered events offset per partition.
    """

    def __init__(self, settings: CommonSettings, *, validate: bool = True, **producer_config: Any) -> None:
        self._producer = make_producer(settings, **producer_config)
        self._validate = validate
        self.events_topic = topic(settings, "events")
        self._labels = topic(settings, "labels")
        self.events = 0
        self.labels = 0
        self.failed = 0
        self.last_offset: dict[int, int] = {}

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            log.error("delivery to %s failed: %s", msg.topic(), err)
        elif msg.topic() == self.events_topic and msg.offset() > self.last_offset.get(msg.partition(), -1):
            self.last_offset[msg.partition()] = msg.offset()

    def send_event(self, event: Mapping[str, Any]) -> None:
        self._send(self.events_topic, "event", event)
        self.events += 1

    def send_label(self, label: Mapping[str, Any]) -> None:
        self._send(self._labels, "label", label)
        self.labels += 1

    def _send(self, topic_name: str, record: str, value: Mapping[str, Any]) -> None:
        payload = codec.encode(record, value, validate=self._validate)
        while True:
            try:
                self._producer.produce(
                    topic_name,
                    key=str(value["card_id"]).encode(),
                    value=payload,
                    on_delivery=self._on_delivery,
                )
                break
            except BufferError:  # local queue full: wait for deliveries, then retry
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        if self._producer.flush(timeout):
            raise StreamError("records still undelivered after flush timeout")
        if self.failed:
            raise StreamError(f"{self.failed} records failed delivery")


def produce_generated(
    settings: CommonSettings,
    *,
    count: int,
    rate: float = 0.0,
    drift_at: int | None = None,
    label_delay: int = 200,
    seed: int = 7,
) -> dict[str, Any]:
    """Generate ``count`` events (at ``rate`` per second, 0 = unthrottled) and all their labels."""
    gen = TransactionGenerator(GeneratorConfig(drift_at=drift_at, label_delay=label_delay, seed=seed))
    out = EventProducer(settings)
    started = time.perf_counter()
    for i in range(count):
        if rate > 0:
            lag = started + i / rate - time.perf_counter()
            if lag > 0:
                time.sleep(lag)
        event, labels = gen.next()
        out.send_event(event)
        for label in labels:
            out.send_label(label)
    for label in gen.drain():
        out.send_label(label)
    out.flush()
    elapsed = time.perf_counter() - started
    return {
        "events": out.events,
        "labels": out.labels,
        "seconds": round(elapsed, 3),
        "events_per_s": round(out.events / elapsed, 1) if elapsed else None,
        "drift_at": drift_at,
    }


def produce_file(settings: CommonSettings, path: Path) -> dict[str, Any]:
    """Produce a JSONL file: event objects, or ``{"label": {...}}`` lines for labels."""
    out = EventProducer(settings)
    rejected: list[dict[str, Any]] = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise SchemaError("line is not a JSON object")
                if "label" in obj:
                    out.send_label(obj["label"])
                else:
                    out.send_event(obj)
            except (ValueError, SchemaError) as exc:
                rejected.append({"line": lineno, "error": str(exc)})
                log.error("%s:%d rejected: %s", path, lineno, exc)
    out.flush()
    return {"events": out.events, "labels": out.labels, "rejected": rejected}
