"""The drift scorer against the real broker and Redis: alerts after a shift, dead letters, replay, and a
project of two models watched at once."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Message, Producer

from infra.kafka import make_producer, reader_from_beginning
from infra.topics import ensure_topics, topic
from models.profile import SCORE, build_profile
from models.versions import replay_versions
from schemas import codec, registry
from schemas.definitions import Labels, Model, Project, Source
from streams import drift, drift_service
from streams.drift import DriftSettings, DriftStep
from tide.embedded import StackInfo
from tide.plan import apply

pytestmark = pytest.mark.integration

SHIFT_AT = 1500
TOTAL = 3000
MODEL = "fraud"  # the fraud example's model: it monitors amount and card_present
PROFILED = ("amount", "card_present", "amount_mean_1h")  # what its reference profiles hold


@pytest.fixture
def settings(stack: StackInfo, topic_prefix: str, tmp_path: Path) -> DriftSettings:
    """The scorer's settings on this test's namespace (the ``fraud`` fixture applies the example on it)."""
    s = stack.settings(
        DriftSettings, topic_prefix=topic_prefix, state_dir=tmp_path, drift_group=topic_prefix + "drift"
    )
    ensure_topics(s)
    return s


@pytest.fixture
def project(fraud: DriftSettings) -> Project:
    """What the scorer's entry point passes down: the definitions the registry holds."""
    return registry.load(fraud).project


def _rows(rng: np.random.Generator, n: int, amount_scale: float = 1.0) -> list[dict[str, Any]]:
    amounts = rng.lognormal(3.5, 0.6, n) * amount_scale
    means = rng.lognormal(3.5, 0.2, n)
    present = rng.random(n) < 0.75
    return [
        {"amount": float(a), "card_present": bool(p), "amount_mean_1h": float(m), "category": "grocery"}
        for a, p, m in zip(amounts, present, means, strict=True)
    ]


def _model_version(
    model: str,
    rows: list[dict[str, Any]],
    scores: list[float],
    profiled: tuple[str, ...],
    task: str = "binary",
) -> bytes:
    record = {
        "model": model,
        "version": 1,
        "flavor": "river",
        "task": task,
        "artifact": b"",
        "sha256": "0" * 64,
        "feature_names": list(profiled),
        "metric_name": "logloss",
        "trained_on": len(rows),
        "reference": build_profile(rows, scores, profiled),
        "created_ts": int(time.time() * 1000),
    }
    return codec.encode("model_version", record)


def _publish_model(settings: DriftSettings, producer: Producer, model: str, rng: np.random.Generator) -> None:
    rows = _rows(rng, 2000)
    record = _model_version(model, rows, list(rng.beta(1, 20, len(rows))), PROFILED)
    producer.produce(topic(settings, "models"), key=model.encode(), value=record)


def _prediction(model: str, i: int, row: dict[str, Any], score: float, entities: dict[str, str]) -> bytes:
    return codec.encode(
        "prediction",
        {
            "request_id": f"r{i}",
            "event_id": f"e{i:05d}",
            "entities": entities,
            "model": model,
            "version": 1,
            "arm": "champion",
            "features": row,
            "score": score,
            "latency_ms": 1.0,
            "ts": int(time.time() * 1000),
        },
    )


def _card(model: str, i: int, row: dict[str, Any], score: float) -> bytes:
    return _prediction(model, i, row, score, {"card_id": "card-1"})


class Runner:
    """Runs ``drift_service.run`` in a thread; ``stop`` joins it and re-raises what it raised."""

    def __init__(self, settings: DriftSettings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self.project: Project | None = None

    def _target(self) -> None:
        assert self.project is not None, "set the runner's project first"
        try:
            drift_service.run(self._settings, self.project, self._stop)
        except BaseException as exc:
            self._errors.append(exc)

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._target, name="drift", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "drift_service.run did not stop within 30 s"
        self._thread = None
        assert not self._errors, self._errors


@pytest.fixture
def runner(settings: DriftSettings) -> Iterator[Runner]:
    r = Runner(settings)
    yield r
    r.stop()


def _wait_for_points(settings: DriftSettings, model: str, n: int, timeout: float = 60) -> list[Any]:
    """The stats points of ``model`` once there are ``n`` (every prediction before them was handled)."""
    client = redis.Redis.from_url(settings.redis_url)
    key = drift.stats_key(model, settings.topic_prefix)
    try:
        deadline = time.monotonic() + timeout
        while client.xlen(key) < n:
            assert time.monotonic() < deadline, f"only {client.xlen(key)} of {n} points in {key}"
            time.sleep(0.2)
        return list(client.xrange(key))
    finally:
        client.close()


def _read_all(
    settings: DriftSettings, name: str, until: Callable[[list[Message]], bool], timeout: float
) -> list[Message]:
    """Read topic ``name`` (one partition, read_committed) from the beginning until ``until`` holds."""
    consumer = reader_from_beginning(settings, topic(settings, name), 1)
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(got):
            for msg in consumer.consume(100, 0.2):
                if msg.error() is None:
                    got.append(msg)
    finally:
        consumer.close()
    return got


def test_alert_after_shift_and_dead_letter(settings: DriftSettings, project: Project, runner: Runner) -> None:
    model = MODEL
    runner.project = project
    rng = np.random.default_rng(2024)
    producer = make_producer(settings)
    _publish_model(settings, producer, model, rng)
    predictions = topic(settings, "predictions")
    rows = _rows(rng, SHIFT_AT) + _rows(rng, TOTAL - SHIFT_AT, amount_scale=3.0)
    scores = rng.beta(1, 20, TOTAL)
    for i, (row, score) in enumerate(zip(rows, scores, strict=True)):
        # One partition: the shift must reach the scorer in order for "no alert before it" to hold.
        producer.produce(predictions, key=b"card-1", value=_card(model, i, row, float(score)), partition=0)
        if i == 100:
            producer.produce(predictions, key=b"bad", value=b"definitely not avro", partition=0)
    assert producer.flush(30) == 0

    runner.start()

    points = _wait_for_points(settings, model, TOTAL // settings.drift_check_every)
    assert len(points) == TOTAL // settings.drift_check_every
    _, last = points[-1]
    # The monitored inputs and the output; amount_mean_1h is in the reference but not monitored.
    assert {k.decode() for k in last} == {
        "ts",
        "version",
        "trigger_event_id",
        "amount",
        "card_present",
        SCORE,
    }
    assert last[b"version"] == b"1" and last[b"trigger_event_id"] == f"e{TOTAL - 1:05d}".encode()
    assert float(last[b"amount"]) > 0.5 > float(last[b"card_present"])  # PSI of amount; |share change|

    # Everything is consumed; the last batch's transaction commits right after its stats were written.
    alerts = [
        codec.decode(m.value() or b"", "drift_alert")
        for m in _read_all(settings, "drift-alerts", lambda got: len(got) > 0, 30)
    ]
    assert alerts, "no drift alert committed"
    assert {a["feature"] for a in alerts} == {"amount"}
    alert = alerts[0]
    assert alert["model"] == model and alert["version"] == 1 and alert["statistic"] in ("psi", "ks")
    assert alert["value"] > alert["threshold"] and alert["kind"] == "input"
    assert alert["feature_type"] == "numeric" and alert["false_alarm_rate"] == 1e-5
    assert alert["window_size"] == settings.drift_window and alert["reference_size"] == 2000
    trigger = int((alert["trigger_event_id"] or "e-1").removeprefix("e"))
    assert SHIFT_AT <= trigger < SHIFT_AT + settings.drift_window, trigger

    letters = _read_all(settings, "dead-letter", lambda got: len(got) > 0, 30)
    assert len(letters) == 1
    letter = letters[0]
    headers = dict(letter.headers() or [])
    assert letter.value() == b"definitely not avro" and letter.key() == b"bad"
    assert headers["tide.stage"] == b"drift"
    assert b"Avro" in headers["tide.error"]
    assert headers["tide.source.topic"] == predictions.encode()

    # After a restart the scorer resumes from its checkpoint: its windows and its disarmed alarm are as
    # they were, so the drift, still there, is not raised again.
    runner.stop()
    runner.start()
    more = zip(_rows(rng, 1000, amount_scale=3.0), rng.beta(1, 20, 1000), strict=True)
    for i, (row, score) in enumerate(more, start=TOTAL):
        producer.produce(predictions, key=b"card-1", value=_card(model, i, row, float(score)), partition=0)
    assert producer.flush(30) == 0
    _wait_for_points(settings, model, (TOTAL + 1000) // settings.drift_check_every)
    assert len(_read_all(settings, "drift-alerts", lambda got: len(got) > 1, 5)) == 1


def test_replay_versions_reads_models_topic_to_its_end(settings: DriftSettings, project: Project) -> None:
    model = MODEL
    rng = np.random.default_rng(7)
    producer = make_producer(settings)
    for _ in range(3):
        _publish_model(settings, producer, model, rng)
    producer.produce(topic(settings, "models"), value=b"garbage")
    assert producer.flush(30) == 0
    step = DriftStep(settings, project, Producerless(), topic(settings, "drift-alerts"))
    started = time.monotonic()
    assert replay_versions(settings, step.version_seen, timeout_s=20) == 3
    assert time.monotonic() - started < 10  # ended at the partition's end, not by the timeout
    ref = step.reference(model)
    assert ref is not None and ref.version == 1 and ref.size == 2000


def test_replay_versions_of_an_empty_topic_ends(settings: DriftSettings, project: Project) -> None:
    step = DriftStep(settings, project, Producerless(), topic(settings, "drift-alerts"))
    started = time.monotonic()
    assert replay_versions(settings, step.version_seen, timeout_s=20) == 0
    assert time.monotonic() - started < 10


class Producerless:
    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None:
        raise AssertionError("replay must not produce")


READINGS: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "tests.drift",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "level", "type": "double"},
        {"name": "ts", "type": "long"},
    ],
}
OUTCOMES: dict[str, Any] = {
    "type": "record",
    "name": "Outcome",
    "namespace": "tests.drift",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "faulty", "type": "boolean"},
        {"name": "minutes", "type": "double"},
        {"name": "ts", "type": "long"},
    ],
}


def plant() -> Project:
    """A second project: a binary and a regression model on one source, each monitoring another input."""
    readings = Source("readings", READINGS, key="sensor_id", event_time="ts")
    outcomes = Source("outcomes", OUTCOMES, key="sensor_id", event_time="ts")
    detector = Model(
        "detector",
        "binary",
        readings,
        ["value", "level"],
        labels=Labels("faulty", outcomes, "reading_id", "faulty", "binary"),
        learner="river.linear_model:LogisticRegression",
        monitor=["value"],
    )
    estimator = Model(
        "estimator",
        "regression",
        readings,
        ["value", "level"],
        labels=Labels("minutes", outcomes, "reading_id", "minutes", "regression"),
        learner="river.linear_model:LinearRegression",
        monitor=["level"],
    )
    return Project.of("plant", [detector, estimator])


def _readings(rng: np.random.Generator, n: int, shifted: bool) -> list[dict[str, Any]]:
    values = rng.normal(85.0 if shifted else 50.0, 10, n)
    levels = rng.normal(80.0 if shifted else 50.0, 5, n)
    return [{"value": float(v), "level": float(m)} for v, m in zip(values, levels, strict=True)]


def test_two_models_alert_per_model_and_input(settings: DriftSettings, runner: Runner) -> None:
    apply(settings, plant())
    runner.project = registry.load(settings).project  # as the entry point does
    rng = np.random.default_rng(99)
    producer = make_producer(settings)
    reference = _readings(rng, 2000, shifted=False)
    models = topic(settings, "models")
    detector_scores, minutes = list(rng.beta(2, 8, 2000)), list(rng.normal(10, 2, 2000))
    producer.produce(
        models,
        key=b"detector",
        value=_model_version("detector", reference, detector_scores, ("value", "level")),
    )
    producer.produce(
        models,
        key=b"estimator",
        value=_model_version("estimator", reference, minutes, ("value", "level"), task="regression"),
    )
    # One stream of readings scored by both models. From the shift on, value and level move for both; the
    # detector's scores stay as they were, the estimator predicts longer. Each model watches only its own.
    rows = _readings(rng, 1000, shifted=False) + _readings(rng, 1000, shifted=True)
    scores = {
        "detector": rng.beta(2, 8, 2000),
        "estimator": np.concatenate([rng.normal(10, 2, 1000), rng.normal(25, 2, 1000)]),
    }
    predictions = topic(settings, "predictions")
    for i, row in enumerate(rows):
        for model in ("detector", "estimator"):
            value = _prediction(model, i, row, float(scores[model][i]), {"sensor_id": "s-1"})
            producer.produce(predictions, key=b"s-1", value=value, partition=0)
    assert producer.flush(30) == 0

    runner.start()
    for model in ("detector", "estimator"):
        _wait_for_points(settings, model, 2000 // settings.drift_check_every)
    alerts = [
        codec.decode(m.value() or b"", "drift_alert")
        for m in _read_all(settings, "drift-alerts", lambda got: len(got) > 3, 10)  # all there is
    ]
    assert sorted((a["model"], a["version"], a["feature"]) for a in alerts) == [
        ("detector", 1, "value"),
        ("estimator", 1, SCORE),
        ("estimator", 1, "level"),
    ]
    for alert in alerts:
        assert 1000 <= int((alert["trigger_event_id"] or "e-1")[1:]) < 1000 + settings.drift_window


def test_a_model_applied_while_the_scorer_runs_is_watched(
    fraud: DriftSettings, settings: DriftSettings, project: Project, runner: Runner
) -> None:
    runner.project = project
    rng = np.random.default_rng(5)
    producer = make_producer(settings)
    predictions = topic(settings, "predictions")
    _publish_model(settings, producer, MODEL, rng)
    for i, row in enumerate(_rows(rng, 100)):
        producer.produce(predictions, key=b"card-1", value=_card(MODEL, i, row, 0.1), partition=0)
    assert producer.flush(30) == 0
    runner.start()
    _wait_for_points(settings, MODEL, 100 // settings.drift_check_every)  # it runs

    # a second model, applied now: its first version and predictions reach the running scorer
    lite = dataclasses.replace(project.models[MODEL], name="fraud_lite", monitor=("amount",))
    apply(fraud, dataclasses.replace(project, models={**project.models, "fraud_lite": lite}))
    _publish_model(settings, producer, "fraud_lite", rng)
    assert producer.flush(30) == 0
    # Serving takes the new model up first (its predictions cannot come before its version); until the
    # scorer has read both, a prediction of it has no reference to be compared with.
    time.sleep(3 * drift.FOLLOW_INTERVAL_S + 1)
    rows = _rows(rng, 1000) + _rows(rng, 1000, amount_scale=3.0)
    for i, (row, score) in enumerate(zip(rows, rng.beta(1, 20, len(rows)), strict=True)):
        value = _card("fraud_lite", i, row, float(score))
        producer.produce(predictions, key=b"card-1", value=value, partition=0)
    assert producer.flush(30) == 0
    points = _wait_for_points(settings, "fraud_lite", len(rows) // settings.drift_check_every)
    assert {k.decode() for k in points[-1][1]} == {"ts", "version", "trigger_event_id", "amount", SCORE}
    alerts = [
        codec.decode(m.value() or b"", "drift_alert")
        for m in _read_all(settings, "drift-alerts", lambda got: len(got) > 0, 30)
    ]
    assert [(a["model"], a["feature"]) for a in alerts] == [("fraud_lite", "amount")]
