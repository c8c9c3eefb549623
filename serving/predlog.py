"""The prediction log: every served score, with its exact features, produced to the predictions topic.

Producing never blocks a request: records go into the producer's bounded in-memory queue
(``serve_prediction_buffer`` records) and a background thread serves the producer (and its failure
reports). While the
broker is away records wait in that queue (``message.timeout.ms`` is long, so an outage only delays
them); when the queue is full new records are dropped and counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import Counter

from infra.errors import SchemaError
from infra.kafka import make_producer
from infra.topics import topic
from schemas import codec
from serving.settings import ServeSettings

logger = logging.getLogger(__name__)

PREDICTIONS_DELIVERED = Counter("tide_prediction_log_delivered_total", "Prediction records acknowledged")
PREDICTIONS_FAILED = Counter("tide_prediction_log_failed_total", "Prediction records the broker never took")
PREDICTIONS_DROPPED = Counter(
    "tide_prediction_log_dropped_total", "Prediction records dropped unsent (queue full, bad record)"
)

# Long enough that a broker outage of this length only delays the log.
MESSAGE_TIMEOUT_MS = 30 * 60 * 1000


def record_key(record: Mapping[str, Any]) -> bytes:
    """A prediction's record key: its entity values (join-key order, unit-separated), else its request id."""
    entities = record.get("entities")
    return ("\x1f".join(entities.values()) if entities else str(record["request_id"])).encode()


class PredictionLog:
    """Produces ``prediction`` records asynchronously, keyed by their entities (:func:`record_key`)."""

    POLL_S = 0.1

    def __init__(self, settings: ServeSettings, producer: Producer | None = None) -> None:
        self.topic = topic(settings, "predictions")
        # Not `producer or ...`: a producer with an empty queue has len() 0 and is falsy.
        self._producer = (
            producer
            if producer is not None
            else make_producer(
                settings,
                **{
                    "queue.buffering.max.messages": settings.serve_prediction_buffer,
                    "message.timeout.ms": MESSAGE_TIMEOUT_MS,
                    # Reports for failures only, through one callback: a Python call per delivered record
                    # cost more than the encoding. Deliveries are counted from what left the queue.
                    "delivery.report.only.error": True,
                    "on_delivery": self._failed,
                },
            )
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queued = 0  # records the producer accepted
        self._failures = 0
        self._counted = 0  # delivered records already added to PREDICTIONS_DELIVERED

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="tide-prediction-log", daemon=True)
            self._thread.start()

    def log(self, record: Mapping[str, Any]) -> None:
        """Queue one prediction record; returns at once, dropping (and counting) it when the queue is full."""
        try:
            # The service builds these records itself: skip validation on the hot path.
            value = codec.encode("prediction", record, validate=False)
        except SchemaError as exc:
            PREDICTIONS_DROPPED.inc()
            logger.error("dropping prediction %s: %s", record.get("request_id"), exc)
            return
        try:
            self._producer.produce(self.topic, value=value, key=record_key(record))
            self._queued += 1
        except BufferError:
            PREDICTIONS_DROPPED.inc()
            logger.debug("prediction log queue full; dropped %s", record.get("request_id"))

    def close(self, timeout: float = 5.0) -> int:
        """Stop polling and flush for up to ``timeout`` seconds; returns how many records were left unsent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        left = self._producer.flush(timeout)
        self._count_delivered()
        if left:
            logger.warning("prediction log closed with %d records unsent on %s", left, self.topic)
        return int(left)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(self.POLL_S)
                self._count_delivered()
            except Exception:
                logger.exception("prediction log poll failed")
                self._stop.wait(self.POLL_S)

    def _count_delivered(self) -> None:
        # Accepted, not failed and no longer queued or in flight: acknowledged by the broker.
        delivered = self._queued - self._failures - len(self._producer)
        if delivered > self._counted:
            PREDICTIONS_DELIVERED.inc(delivered - self._counted)
            self._counted = delivered

    def _failed(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:  # only failures are reported ("delivery.report.only.error")
            return
        PREDICTIONS_FAILED.inc()
        self._failures += 1
        if self._failures % 1000 == 1:  # an outage fails records by the thousand: say so, not each one
            logger.warning(
                "prediction records to %s failed (%d so far): %s", msg.topic(), self._failures, err
            )
