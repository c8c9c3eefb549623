"""The PSI drift detector and the drift step over a project's models, with in-memory doubles for the producer
and the stats sink."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from infra.errors import StreamError
from infra.processor import Incoming
from models.profile import SCORE, build_profile, histogram
from schemas import codec
from schemas.definitions import Labels, Model, Project, Source
from streams.drift import DriftSettings, DriftStep, watched
from streams.psi import PsiDriftDetector

PROFILED = ("value", "flag", "level")  # what the reference profiles hold a histogram of


def _detector(ref: Sequence[float], window: int = 1000, threshold: float = 0.25) -> PsiDriftDetector:
    return PsiDriftDetector(histogram("x", list(ref)), window=window, threshold=threshold, rearm_ratio=0.5)


def _first_alert(detector: PsiDriftDetector, values: Sequence[float], check_every: int = 1) -> int | None:
    """Index of the value after which ``check`` first returned True, or None."""
    for i, v in enumerate(values):
        detector.update(float(v))
        if (i + 1) % check_every == 0 and detector.check():
            return i
    return None


# -- detector ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_no_alert_on_same_distribution_normal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    det = _detector(rng.normal(50, 10, 5000))
    assert _first_alert(det, rng.normal(50, 10, 6000)) is None
    assert det.window_full and det.statistic < 0.1
    assert not det.drift_detected


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_no_alert_on_same_distribution_bernoulli(seed: int) -> None:
    rng = np.random.default_rng(seed)
    det = _detector((rng.random(5000) < 0.75).astype(float))
    assert _first_alert(det, (rng.random(6000) < 0.75).astype(float)) is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_alert_soon_after_mean_shift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    det = _detector(rng.normal(0, 1, 5000))
    before = rng.normal(0, 1, 2000)
    after = rng.normal(1.0, 1, 2000)
    i = _first_alert(det, np.concatenate([before, after]))
    assert i is not None and 2000 <= i < 2000 + 700, i
    assert det.drift_detected and det.statistic > 0.25


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_alert_soon_after_bernoulli_rate_drop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    det = _detector((rng.random(5000) < 0.75).astype(float))
    before = (rng.random(2000) < 0.75).astype(float)
    after = (rng.random(2000) < 0.35).astype(float)
    i = _first_alert(det, np.concatenate([before, after]), check_every=100)
    assert i is not None and 2000 <= i < 2000 + 700, i


def test_no_alert_until_window_full() -> None:
    rng = np.random.default_rng(7)
    det = _detector(rng.normal(0, 1, 2000), window=500)
    for v in rng.normal(5, 1, 499):
        det.update(float(v))
    assert det.statistic > 0.25 and not det.window_full
    assert not det.check() and not det.drift_detected
    det.update(5.0)
    assert det.window_full and det.check()


def test_rising_edge_only_and_rearm() -> None:
    rng = np.random.default_rng(11)
    det = _detector(rng.normal(0, 1, 5000), window=500)
    shifted, normal = rng.normal(2, 1, 3000), rng.normal(0, 1, 3000)
    edges = []
    for v in shifted:
        det.update(float(v))
        edges.append(det.check())
    assert sum(edges) == 1  # fired once while the shift lasted
    assert det.drift_detected
    # Back to the reference distribution: the level drops once PSI < threshold * rearm_ratio ...
    for v in normal:
        det.update(float(v))
        assert not det.check()
    assert not det.drift_detected and det.statistic < 0.125
    # ... and a new shift fires again.
    assert _first_alert(det, rng.normal(2, 1, 1000)) is not None


def test_hysteresis_holds_between_rearm_level_and_threshold() -> None:
    ref = {"name": "x", "edges": [0.5], "counts": [500, 500]}
    det = PsiDriftDetector(ref, window=100, threshold=0.25, rearm_ratio=0.5)
    for _ in range(100):
        det.update(1.0)  # every live value in bin 1
    assert det.check()
    for _ in range(30):
        det.update(0.0)  # 30/70: PSI ~0.17, below the threshold, above the re-arm level 0.125
    assert 0.125 < det.statistic < 0.25
    assert det.drift_detected and not det.check()
    for _ in range(5):
        det.update(0.0)  # 35/65: PSI ~0.09, re-armed
    assert det.statistic < 0.125
    assert not det.drift_detected and not det.check()
    for _ in range(100):
        det.update(1.0)  # the window all in bin 1 again
    assert det.check()


def test_detector_sliding_counts_and_nan() -> None:
    det = PsiDriftDetector({"name": "x", "edges": [0.0, 1.0], "counts": [1, 1, 1]}, 3, 0.25)
    for v in (-1.0, 0.5, 2.0, float("nan"), 2.0):
        det.update(v)
    assert det.n == 3 and det._live == [0, 1, 2]
    assert det.reference_size == 3


@pytest.mark.parametrize(
    "ref",
    [
        {"name": "x", "edges": [0.0, 1.0], "counts": [1, 1]},
        {"name": "x", "edges": [1.0, 0.0], "counts": [1, 1, 1]},
        {"name": "x", "edges": [0.0], "counts": [0, 0]},
    ],
)
def test_detector_rejects_bad_reference(ref: dict[str, Any]) -> None:
    with pytest.raises(StreamError):
        PsiDriftDetector(ref, 10, 0.25)


# -- step ----------------------------------------------------------------------------------------------

READINGS: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "test",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "flag", "type": "boolean"},
        {"name": "level", "type": "double"},
        {"name": "kind", "type": "string"},
        {"name": "ts", "type": "long"},
    ],
}
OUTCOMES: dict[str, Any] = {
    "type": "record",
    "name": "Outcome",
    "namespace": "test",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "faulty", "type": "boolean"},
        {"name": "minutes", "type": "double"},
        {"name": "grade", "type": "string"},
        {"name": "ts", "type": "long"},
    ],
}


def plant() -> Project:
    """Three models, one per task, on one request source: each watches other inputs."""
    readings = Source("readings", READINGS, key="sensor_id", event_time="ts")
    outcomes = Source("outcomes", OUTCOMES, key="sensor_id", event_time="ts")
    fields = ["value", "flag", "level", "kind"]
    detector = Model(
        "detector",
        "binary",
        readings,
        fields,
        labels=Labels("faulty", outcomes, "reading_id", "faulty", "binary"),
        learner="river.linear_model:LogisticRegression",
        monitor=["value", "flag", "kind"],  # kind is a string: no reference histogram of it
    )
    estimator = Model(
        "estimator",
        "regression",
        readings,
        fields,
        labels=Labels("minutes", outcomes, "reading_id", "minutes", "regression"),
        learner="river.linear_model:LinearRegression",
        monitor=["level"],
    )
    sorter = Model(
        "sorter",
        "multiclass",
        readings,
        fields,
        labels=Labels("grade", outcomes, "reading_id", "grade", "multiclass"),
        learner="river.tree:HoeffdingTreeClassifier",
        monitor=["value"],
    )
    return Project.of("plant", [detector, estimator, sorter])


PROJECT = plant()


class FakeProducer:
    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes | None, bytes | None]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None:
        self.produced.append((topic, value, key))

    def alerts(self) -> list[dict[str, Any]]:
        return [codec.decode(v or b"", "drift_alert") for _, v, _ in self.produced]


def _incoming(name: str, record: Mapping[str, Any], offset: int = 0) -> Incoming:
    # Through the codec, so every record here is one the real processor could hand over.
    return Incoming(name, codec.decode(codec.encode(name, record), name), None, name, 0, offset, 0)


def _rows(
    rng: np.random.Generator,
    n: int,
    value_mean: float = 50.0,
    flag_rate: float = 0.75,
    level_mean: float = 50.0,
) -> list[dict]:
    return [
        {"value": float(a), "flag": bool(p), "level": float(m), "kind": "a"}
        for a, p, m in zip(
            rng.normal(value_mean, 10, n),
            rng.random(n) < flag_rate,
            rng.normal(level_mean, 5, n),
            strict=True,
        )
    ]


def _model_version(model: str, version: int, rows: list[dict], scores: list[float]) -> dict[str, Any]:
    return {
        "model": model,
        "version": version,
        "flavor": "river",
        "task": PROJECT.models[model].task if model in PROJECT.models else "binary",
        "artifact": b"",
        "sha256": "0" * 64,
        "feature_names": list(PROFILED),
        "metric_name": "logloss",
        "trained_on": len(rows),
        "reference": build_profile(rows, scores, PROFILED),
        "created_ts": 1_700_000_000_000,
    }


def _prediction(
    model: str, version: int, row: dict, score: float, i: int, arm: str = "champion"
) -> dict[str, Any]:
    record = {
        "request_id": f"r{i}",
        "event_id": f"e{i:05d}",
        "entities": {"sensor_id": "s-1"},
        "model": model,
        "version": version,
        "arm": arm,
        "features": row,
        "score": score,
        "latency_ms": 1.0,
        "ts": 1_700_000_000_000 + i,
    }
    if model == "sorter":  # what a multiclass runtime answers: the top class and every probability
        rest = (1.0 - score) / 2
        record |= {"label": "a", "probabilities": {"a": score, "b": rest, "c": rest}}
    return record


def _publish(
    step: DriftStep,
    rng: np.random.Generator,
    model: str,
    version: int,
    n: int,
    value_mean: float = 50.0,
    scores: Sequence[float] | None = None,
) -> None:
    rows = _rows(rng, n, value_mean)
    mv = _model_version(model, version, rows, list(rng.random(n) if scores is None else scores))
    step.handle(_incoming("model_version", mv))


@pytest.fixture
def settings() -> DriftSettings:
    return DriftSettings(drift_window=500, drift_check_every=50, drift_min_reference=200)


def _step(
    settings: DriftSettings, producer: FakeProducer | None = None, points: list[Any] | None = None
) -> DriftStep:
    sink = points.extend if points is not None else None
    return DriftStep(
        settings, PROJECT, producer or FakeProducer(), "drift-alerts", sink, clock=lambda: 1_700_000_123.0
    )


def _feed(
    step: DriftStep, model: str, version: int, rows: list[dict], scores: Sequence[float], start: int
) -> None:
    for i, (row, score) in enumerate(zip(rows, scores, strict=True)):
        step.handle(_incoming("prediction", _prediction(model, version, row, float(score), start + i)))
        if (i + 1) % 100 == 0:
            assert step.flush() is True


def test_what_is_watched_per_model() -> None:
    assert watched(PROJECT.models["detector"]) == ("value", "flag", "kind", SCORE)
    assert watched(PROJECT.models["estimator"]) == ("level", SCORE)
    assert watched(PROJECT.models["sorter"]) == ("value", SCORE)


def test_step_alerts_after_shift_with_the_right_input(
    settings: DriftSettings, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(42)
    producer, points = FakeProducer(), []
    step = _step(settings, producer, points)
    with caplog.at_level(logging.WARNING, "streams.drift"):
        _publish(step, rng, "detector", 1, 3000)
        _feed(step, "detector", 1, _rows(rng, 1500), rng.random(1500), 0)
    assert "model detector v1: the reference profile has no histogram of kind; not watched" in caplog.text
    step.flush()
    assert producer.produced == []
    assert len(points) == 1500 // 50
    model, point = points[-1]
    assert model == "detector" and point["version"] == 1 and point["trigger_event_id"] == "e01499"
    # Only the monitored inputs the reference has, and the output: level is profiled but not monitored.
    assert set(point) == {"ts", "version", "trigger_event_id", "value", "flag", SCORE}
    assert point["ts"] == 1_700_000_123_000

    _feed(step, "detector", 1, _rows(rng, 1500, value_mean=80.0, level_mean=90.0), rng.random(1500), 1500)
    alerts = producer.alerts()
    assert [a["feature"] for a in alerts] == ["value"]
    alert = alerts[0]
    topic, _, key = producer.produced[0]
    assert topic == "drift-alerts" and key == b"detector"
    assert alert["model"] == "detector" and alert["version"] == 1 and alert["statistic"] == "psi"
    assert alert["value"] > alert["threshold"] == 0.25
    assert alert["window_size"] == 500 and alert["reference_size"] == 3000
    trigger = int(alert["trigger_event_id"].removeprefix("e"))
    assert 1500 <= trigger < 1500 + 500 and (trigger + 1) % 50 == 0
    assert alert["ts"] == 1_700_000_123_000 and len(alert["alert_id"]) == 32


def test_each_model_alerts_on_its_own_inputs_and_output(settings: DriftSettings) -> None:
    rng = np.random.default_rng(17)
    producer, points = FakeProducer(), []
    step = _step(settings, producer, points)
    # Reference outputs: the estimator predicts around 10 minutes, the sorter is confident (top class ~0.9).
    _publish(step, rng, "detector", 1, 2000)
    _publish(step, rng, "estimator", 4, 2000, scores=rng.normal(10, 2, 2000))
    _publish(step, rng, "sorter", 2, 2000, scores=rng.uniform(0.8, 1.0, 2000))

    def feed_all(n: int, start: int, *, shifted: bool) -> None:
        # One stream of readings, scored by all three models; after the shift, value and level move,
        # the estimator predicts longer and the sorter grows unsure.
        rows = _rows(rng, n, value_mean=85.0 if shifted else 50.0, level_mean=80.0 if shifted else 50.0)
        minutes = rng.normal(25 if shifted else 10, 2, n)
        confidence = rng.uniform(0.4, 0.6, n) if shifted else rng.uniform(0.8, 1.0, n)
        detector = rng.random(n)
        for i, row in enumerate(rows):
            for model, version, score in (
                ("detector", 1, detector[i]),
                ("estimator", 4, minutes[i]),
                ("sorter", 2, confidence[i]),
            ):
                step.handle(
                    _incoming("prediction", _prediction(model, version, row, float(score), start + i))
                )
        step.flush()

    feed_all(1000, 0, shifted=False)
    assert producer.produced == []
    assert {m for m, _ in points} == {"detector", "estimator", "sorter"}
    feed_all(1000, 1000, shifted=True)
    raised = sorted((a["model"], a["version"], a["feature"]) for a in producer.alerts())
    assert raised == [
        ("detector", 1, "value"),
        ("estimator", 4, SCORE),
        ("estimator", 4, "level"),
        ("sorter", 2, SCORE),
        ("sorter", 2, "value"),
    ]
    keys = {(key, codec.decode(v or b"", "drift_alert")["model"]) for _, v, key in producer.produced}
    assert keys == {(b"detector", "detector"), (b"estimator", "estimator"), (b"sorter", "sorter")}
    latest = {m: p for m, p in points}
    assert set(latest["estimator"]) == {"ts", "version", "trigger_event_id", "level", SCORE}
    assert set(latest["sorter"]) == {"ts", "version", "trigger_event_id", "value", SCORE}


def test_step_ignores_other_arms_unknown_models_and_small_references(settings: DriftSettings) -> None:
    rng = np.random.default_rng(3)
    producer, points = FakeProducer(), []
    step = _step(settings, producer, points)
    _publish(step, rng, "estimator", 1, 100)  # too small a reference
    assert step.reference("estimator") is None
    no_ref = _model_version("sorter", 1, _rows(rng, 10), [])
    no_ref["reference"] = None
    step.handle(_incoming("model_version", no_ref))
    assert step.reference("sorter") is None
    _publish(step, rng, "unknown", 1, 1000)  # not a model of the project
    assert step.reference("unknown") is None

    _publish(step, rng, "detector", 1, 1000)
    shifted = _rows(rng, 1000, value_mean=200.0)
    for i, row in enumerate(shifted):
        for model, arm in (("detector", "canary"), ("detector", "shadow"), ("unknown", "champion")):
            step.handle(_incoming("prediction", _prediction(model, 1, row, 0.5, i, arm)))
    step.flush()
    assert producer.produced == [] and points == []


def test_reference_for_version_2_replaces_version_1(settings: DriftSettings) -> None:
    rng = np.random.default_rng(5)
    producer, points = FakeProducer(), []
    step = _step(settings, producer, points)
    _publish(step, rng, "detector", 1, 1000)
    # Version 2 was trained on much larger values.
    _publish(step, rng, "detector", 2, 1000, 150.0)
    assert step.reference("detector").version == 2  # type: ignore[union-attr]
    assert step.reference("detector", 1).version == 1  # type: ignore[union-attr]
    # A replay of version 1 does not make it current again.
    _publish(step, rng, "detector", 1, 1000)
    assert step.reference("detector").version == 2  # type: ignore[union-attr]

    # Predictions of a version without its own reference are compared with the latest one (v2):
    # values like v2's raise nothing, values like v1's drift.
    _feed(step, "detector", 3, _rows(rng, 1000, 150.0), rng.random(1000), 0)
    assert producer.produced == []
    assert {p["version"] for _, p in points} == {2}
    _feed(step, "detector", 3, _rows(rng, 1000, 50.0), rng.random(1000), 1000)
    alerts = producer.alerts()
    assert [(a["feature"], a["version"]) for a in alerts] == [("value", 2)]

    # Predictions of version 1 are still compared with v1's own reference.
    producer.produced.clear()
    _feed(step, "detector", 1, _rows(rng, 1000, 50.0), rng.random(1000), 2000)
    assert producer.produced == []


def test_new_reference_is_compared_with_the_live_window_at_once(settings: DriftSettings) -> None:
    rng = np.random.default_rng(8)
    producer = FakeProducer()
    step = _step(settings, producer)
    _publish(step, rng, "detector", 1, 1000)
    _feed(step, "detector", 1, _rows(rng, 1000), rng.random(1000), 0)
    assert producer.produced == []
    # Version 2 was trained on other values; its predictions see the same live inputs. The windows carry
    # over, so the first check of version 2 already compares a full window and alerts.
    _publish(step, rng, "detector", 2, 1000, 150.0)
    _feed(step, "detector", 2, _rows(rng, 50), rng.random(50), 1000)
    alerts = producer.alerts()
    assert [(a["feature"], a["version"], a["trigger_event_id"]) for a in alerts] == [("value", 2, "e01049")]


def test_changed_reference_for_a_version_keeps_the_live_windows(settings: DriftSettings) -> None:
    rng = np.random.default_rng(4)
    step = _step(settings)
    _publish(step, rng, "detector", 1, 1000)
    _feed(step, "detector", 1, _rows(rng, 300), rng.random(300), 0)
    _publish(step, rng, "detector", 1, 1000)  # other rows: another reference under the same version
    monitor = step._models["detector"].monitors[1]
    assert monitor.reference == step.reference("detector", 1)
    assert {d.n for d in monitor.detectors.values()} == {300}


def test_step_bad_records_raise_and_leave_windows_alone(settings: DriftSettings) -> None:
    rng = np.random.default_rng(9)
    step = _step(settings)
    _publish(step, rng, "detector", 1, 1000)
    row = _rows(rng, 1)[0]
    step.handle(_incoming("prediction", _prediction("detector", 1, row, 0.5, 0)))
    bad = dict(row, flag="yes")
    with pytest.raises(StreamError, match=r"model detector v1: input 'flag' is not numeric"):
        step.handle(_incoming("prediction", _prediction("detector", 1, bad, 0.5, 1)))
    monitor = step._models["detector"].monitors[1]
    assert {d.n for d in monitor.detectors.values()} == {1}
    with pytest.raises(StreamError):
        step.handle(Incoming("label", {}, None, "labels", 0, 0, 0))


def test_step_rejects_malformed_reference(settings: DriftSettings) -> None:
    rng = np.random.default_rng(1)
    step = _step(settings)
    mv = _model_version("detector", 1, _rows(rng, 1000), list(rng.random(1000)))
    mv["reference"]["features"][0]["counts"].append(5)
    with pytest.raises(StreamError, match="value"):
        step.handle(_incoming("model_version", mv))
    assert step.reference("detector") is None


def test_missing_inputs_count_as_zero_like_the_profile(settings: DriftSettings) -> None:
    # build_profile reads a missing input as 0.0; so does the step: no drift from absence alone.
    rng = np.random.default_rng(2)
    rows = [{"value": float(a)} for a in rng.normal(50, 10, 2000)]
    producer = FakeProducer()
    step = _step(settings, producer)
    step.handle(_incoming("model_version", _model_version("detector", 1, rows, list(rng.random(2000)))))
    _feed(step, "detector", 1, [{"value": float(a)} for a in rng.normal(50, 10, 2000)], rng.random(2000), 0)
    assert producer.produced == []


def test_a_new_version_starts_its_score_window_empty(settings: DriftSettings) -> None:
    rng = np.random.default_rng(5)
    step = _step(settings)
    _publish(step, rng, "detector", 1, 1000)
    _feed(step, "detector", 1, _rows(rng, 300), rng.random(300), 0)
    _publish(step, rng, "detector", 2, 1000)
    _feed(step, "detector", 2, _rows(rng, 1), rng.random(1), 300)
    monitor = step._models["detector"].monitors[2]
    sizes = {name: d.n for name, d in monitor.detectors.items()}
    assert sizes.pop(SCORE) == 1  # version 1's scores are not version 2's
    assert set(sizes.values()) == {301}  # inputs are inputs, whichever version scores them


def test_new_definitions_watch_added_models_and_drop_removed_ones(settings: DriftSettings) -> None:
    rng = np.random.default_rng(8)
    producer = FakeProducer()
    only_detector = replace(PROJECT, models={"detector": PROJECT.models["detector"]})
    step = DriftStep(settings, only_detector, producer, "drift-alerts", None)
    _publish(step, rng, "detector", 1, 1000)
    _publish(step, rng, "sorter", 1, 1000)  # a model applied a moment ago, not yet in the definitions
    _publish(step, rng, "sorter", 2, 1000)
    assert step.reference("sorter") is None
    # the sorter is applied; the detector is removed, and the estimator now monitors `value` too
    estimator = replace(PROJECT.models["estimator"], monitor=("level", "value"))
    step.update(replace(PROJECT, models={"sorter": PROJECT.models["sorter"], "estimator": estimator}))
    assert step.reference("sorter") == step.reference("sorter", 2) and step.reference("sorter", 1)
    assert step.reference("detector") is None
    _publish(step, rng, "estimator", 1, 1000)
    for i, row in enumerate(_rows(rng, 1000, value_mean=200.0)):
        for model in ("sorter", "estimator", "detector"):
            step.handle(
                _incoming("prediction", _prediction(model, 2 if model == "sorter" else 1, row, 0.5, i))
            )
    step.flush()
    raised = {(a["model"], a["feature"]) for a in producer.alerts()}
    assert ("sorter", "value") in raised and ("estimator", "value") in raised
    assert not any(model == "detector" for model, _ in raised)
