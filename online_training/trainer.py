"""The online trainer: joins late labels with the features that were served, learns, publishes versions.

Serving logs the exact feature values it used for every prediction; labels arrive later on their own
topic. The trainer parks each side in Redis under the event id until the other side arrives, so the
join survives restarts, learns from each matched pair (progressive validation: score, then learn), and
every ``publish_every`` labels publishes a model version with its metric and a reference profile. The
version and the consumed offsets are committed in one Kafka transaction, and a restarted trainer resumes
from the last published version: labels are neither lost nor learnt twice.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import orjson
import redis
from confluent_kafka import Producer
from prometheus_client import Counter, Gauge
from pydantic import Field

from models.artifacts import record_artifact
from infra.errors import ModelLoadError, TrainingError
from infra.metrics import serve_metrics
from infra.settings import CommonSettings
from examples.fraud import model as fraud_model
from models.profile import build_profile
from online_training.publish import latest_record, publish_model_version, signer_of
from online_training.settings import PublishSettings
from infra import processor
from infra.deadletter import KafkaDeadLetters
from infra.kafka import make_consumer, make_producer, make_transactional_producer
from infra.processor import Incoming
from infra.topics import topic

log = logging.getLogger(__name__)

LEARNT = Counter(
    "tide_trainer_labels_learnt_total", "Labels joined with served features and learnt", ["model"]
)
PUBLISHED = Counter("tide_trainer_versions_published_total", "Model versions published", ["model"])
METRIC = Gauge(
    "tide_trainer_online_metric", "Online (progressive) metric of the trainer", ["model", "metric"]
)
SERVED_ARMS = ("champion", "canary")  # shadow predictions were not what the caller received


class TrainerSettings(PublishSettings):
    trainer_group: str = "tide-trainer"
    trainer_publish_every: int = Field(default=500, ge=1)
    # A quiet stream still publishes what was learnt since the last version after this long.
    trainer_publish_interval_s: float = Field(default=10.0, gt=0)
    trainer_join_ttl_s: int = Field(default=86_400, ge=1)
    trainer_reference_size: int = Field(default=2000, ge=10)
    trainer_metric_window: int = Field(default=2000, ge=10)


def rolling_auc(labels: list[bool], scores: list[float]) -> float | None:
    """ROC AUC by ranks (ties averaged); None while one class is absent."""
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    s = np.asarray(scores, dtype=float)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


class TrainerStep:
    """The join-learn-publish step (see the module docstring)."""

    name = "trainer"

    def __init__(
        self,
        settings: TrainerSettings,
        producer: Producer,
        join_store: redis.Redis,
        model: Any = None,
        version: int = 0,
        trained_on: int = 0,
    ) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self.model = model if model is not None else fraud_model.new_model()
        self.version = version
        self.trained_on = trained_on
        self._producer = producer
        self._redis = join_store
        self._predictions: dict[str, dict[str, Any]] = {}
        self._labels: dict[str, bool] = {}
        self._since_publish = 0
        self._published_at = time.monotonic()
        self._recent: deque[tuple[bool, float]] = deque(maxlen=settings.trainer_metric_window)
        self._reference: deque[dict[str, Any]] = deque(maxlen=settings.trainer_reference_size)

    def _key(self, side: str, event_id: str) -> str:
        return f"{self.settings.topic_prefix}tide:join:{self.model_name}:{side}:{event_id}"

    def handle(self, item: Incoming) -> None:
        v = item.value
        if item.record == "prediction":
            if v["model"] == self.model_name and v["arm"] in SERVED_ARMS and v.get("event_id"):
                self._predictions[v["event_id"]] = v["features"]
        elif item.record == "label":
            self._labels[v["event_id"]] = bool(v["is_fraud"])

    def flush(self) -> bool:
        preds, labels = self._predictions, self._labels
        self._predictions, self._labels = {}, {}
        ttl = self.settings.trainer_join_ttl_s
        pipe = self._redis.pipeline(transaction=False)
        for event_id, features in preds.items():
            pipe.set(self._key("p", event_id), orjson.dumps(features), ex=ttl)
        for event_id in preds:
            pipe.get(self._key("l", event_id))
        for event_id in labels:
            pipe.get(self._key("p", event_id))
        results = pipe.execute()[len(preds) :]
        pairs: list[tuple[dict[str, Any], bool]] = []
        for event_id, parked in zip(preds, results[: len(preds)], strict=True):
            if parked is not None:
                pairs.append((preds[event_id], parked == b"1"))
        unmatched = {}
        for (event_id, y), served in zip(labels.items(), results[len(preds) :], strict=True):
            if served is not None:
                pairs.append((orjson.loads(served), y))
            else:
                unmatched[event_id] = y
        if unmatched:
            pipe = self._redis.pipeline(transaction=False)
            for event_id, y in unmatched.items():
                pipe.set(self._key("l", event_id), b"1" if y else b"0", ex=ttl)
            pipe.execute()
        for x, y in pairs:
            self.learn_one(x, y)
        if self._since_publish >= self.settings.trainer_publish_every:
            self.publish()
            return True
        return self.idle()

    def idle(self) -> bool:
        if (
            self._since_publish
            and time.monotonic() - self._published_at >= self.settings.trainer_publish_interval_s
        ):
            self.publish()
            return True
        return False

    def learn_one(self, x: dict[str, Any], y: bool) -> None:
        score = self.model.predict_proba_one(x).get(True, 0.0)
        self._recent.append((y, score))
        self.model.learn_one(x, y)
        self._reference.append(x)
        self.trained_on += 1
        self._since_publish += 1
        LEARNT.labels(self.model_name).inc()

    def metric(self) -> float | None:
        ys, ps = zip(*self._recent, strict=True) if self._recent else ((), ())
        return rolling_auc(list(ys), list(ps))

    def publish(self, producer: Producer | None = None) -> None:
        """Produce the next version (to the step's transactional producer unless another is given)."""
        self.version += 1
        blob, _ = fraud_model.dump(self.model)
        rows = list(self._reference)
        scores = [self.model.predict_proba_one(x).get(True, 0.0) for x in rows]
        record = publish_model_version(
            self.settings,
            model=self.model_name,
            version=self.version,
            flavor="river",
            artifact=blob,
            feature_names=fraud_model.FEATURE_NAMES,
            metric_name=f"roc_auc_last_{self.settings.trainer_metric_window}",
            metric_value=self.metric(),
            trained_on=self.trained_on,
            reference=build_profile(rows, scores, fraud_model.PROFILED) if rows else None,
            producer=producer or self._producer,
        )
        self._since_publish = 0
        self._published_at = time.monotonic()
        PUBLISHED.labels(self.model_name).inc()
        if record["metric_value"] is not None:
            METRIC.labels(self.model_name, record["metric_name"]).set(record["metric_value"])
        log.info(
            "published model=%s version=%d trained_on=%d %s=%s",
            self.model_name,
            self.version,
            self.trained_on,
            record["metric_name"],
            record["metric_value"],
        )


def latest_version(settings: CommonSettings) -> dict[str, Any] | None:
    """The newest committed version of the model on the models topic, read from the beginning."""
    return latest_record(settings, settings.model_name)


def restore_or_bootstrap(
    settings: TrainerSettings, producer: Producer, join_store: redis.Redis
) -> TrainerStep:
    """Resume from the newest published version, or publish version 1 (untrained) so serving can start."""
    latest = latest_version(settings)
    if latest is not None and latest["flavor"] == "river":
        try:
            model = fraud_model.load(record_artifact(latest), latest["sha256"])
        except ModelLoadError as exc:
            raise TrainingError(f"cannot resume from version {latest['version']}: {exc}") from exc
        log.info("resuming model=%s from version %d", settings.model_name, latest["version"])
        return TrainerStep(settings, producer, join_store, model, latest["version"], latest["trained_on"])
    step = TrainerStep(settings, producer, join_store)
    bootstrap = make_producer(settings)  # outside any transaction: no offsets belong to version 1
    step.publish(bootstrap)
    if bootstrap.flush(10):
        raise TrainingError("could not publish the bootstrap model version")
    return step


def run(settings: TrainerSettings, stop: threading.Event | None = None) -> None:
    """Run the trainer until ``stop`` is set or SIGTERM/SIGINT arrives."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    serve_metrics(settings)
    signer_of(settings)  # a bad signing key fails now, not at the first publish
    join_store = redis.Redis.from_url(settings.redis_url)
    producer = make_transactional_producer(settings, f"{settings.topic_prefix}{settings.trainer_group}")
    step = restore_or_bootstrap(settings, producer, join_store)
    consumer = make_consumer(settings, settings.trainer_group)
    expected: dict[str, str | None] = {
        topic(settings, "predictions"): "prediction",
        topic(settings, "labels"): "label",
    }
    try:
        processor.run(
            step,
            consumer,
            producer,
            KafkaDeadLetters(producer, topic(settings, "dead-letter")),
            expected,
            stop,
        )
    finally:
        join_store.close()
