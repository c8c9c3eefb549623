"""Drift tests by feature type, the alarm's hysteresis and cool-down, reference profiles, and the drift
step over a project's models (with in-memory doubles for the producer and the stats sink), including its
snapshot and restore."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from infra.errors import StreamError
from infra.processor import Incoming
from models.profile import LABEL, SCORE, build_profile, category_counts, histogram, profile_from_columns
from schemas import codec
from schemas.definitions import Labels, Model, Project, Source
from schemas.policy import Drift, Policy
from streams import drift_tests
from streams.drift import DriftSettings, DriftStep, watched
from streams.drift_state import Alarm

PROFILED = ("value", "flag", "level", "kind")  # what the reference profiles hold


# -- tests by type ------------------------------------------------------------------------------------


def _null_windows(test: drift_tests.DriftTest, draw: Any, n: int) -> int:
    """How many of ``n`` independent windows drawn by ``draw`` fire."""
    return sum(test.evaluate(draw()).fired for _ in range(n))


def test_numeric_holds_its_false_alarm_rate_on_the_reference_population() -> None:
    rng = np.random.default_rng(1)
    ref = histogram("x", list(rng.normal(50, 10, 2000)))
    test = drift_tests.for_histogram(ref, 500, 0.02, 0.5)
    fired = _null_windows(test, lambda: rng.normal(50, 10, 500), 1500)
    assert fired / 1500 < 0.04  # nominal 0.02; PSI's part is within 2x of its share (streams.psi)
    # the threshold is calibrated, not fixed: a lower rate asks for a larger statistic
    strict = drift_tests.for_histogram(ref, 500, 1e-5, 0.5)
    assert strict.psi_threshold > test.psi_threshold and strict.ks_threshold > test.ks_threshold
    assert _null_windows(strict, lambda: rng.normal(50, 10, 500), 300) == 0


def test_numeric_fires_on_a_shift_with_estimates() -> None:
    rng = np.random.default_rng(2)
    test = drift_tests.for_histogram(histogram("x", list(rng.normal(0, 1, 2000))), 500, 1e-5, 0.5)
    out = test.evaluate(list(rng.normal(0.5, 1, 500)))
    assert out.fired and out.statistic in ("psi", "ks") and out.value > out.threshold
    assert out.estimate_before is not None and abs(out.estimate_before) < 0.2
    assert out.estimate_after is not None and 0.3 < out.estimate_after < 0.7
    calm = test.evaluate(list(rng.normal(0, 1, 500)))
    assert not calm.fired and calm.calm and calm.statistic == "psi"


def test_categorical_chi_square_pools_rare_and_unseen_values() -> None:
    rng = np.random.default_rng(3)
    values = ["a", "b", "c", "d", "rare"]
    shares = [0.4, 0.3, 0.2, 0.098, 0.002]
    test = drift_tests.for_counts(category_counts("k", rng.choice(values, 3000, p=shares)), 500, 0.01, 0.5)
    assert test.feature_type == "categorical"
    fired = _null_windows(test, lambda: list(rng.choice(values, 500, p=shares)), 1000)
    assert fired / 1000 < 0.025
    out = test.evaluate(list(rng.choice(values, 500, p=[0.25, 0.25, 0.25, 0.248, 0.002])))
    assert out.fired and out.statistic == "chi2" and out.p_value is not None and out.p_value < 0.01
    # a value the reference never saw, in a tenth of the window, is drift
    assert test.evaluate(list(rng.choice(values, 450, p=shares)) + ["new"] * 50).fired


def test_binary_fisher_test_with_proportions() -> None:
    rng = np.random.default_rng(4)
    test = drift_tests.for_counts(category_counts("f", list(rng.random(2000) < 0.75)), 500, 1e-5, 0.5)
    assert test.feature_type == "binary"
    same = test.evaluate(["true" if v else "false" for v in rng.random(500) < 0.75])
    assert not same.fired and same.statistic == "proportion"
    out = test.evaluate(["true" if v else "false" for v in rng.random(500) < 0.55])
    assert out.fired and out.p_value is not None and out.p_value < 1e-5
    assert out.estimate_before == pytest.approx(0.75, abs=0.03)
    assert out.estimate_after == pytest.approx(0.55, abs=0.06)
    assert 0 < out.threshold <= out.value
    with pytest.raises(ValueError):
        test.convert("maybe")


def test_a_one_bin_reference_never_fires() -> None:
    test = drift_tests.for_histogram({"name": "x", "edges": [], "counts": [1000]}, 100, 1e-5, 0.5)
    assert not test.evaluate([5.0] * 100).fired


@pytest.mark.parametrize(
    "ref",
    [
        {"name": "x", "edges": [0.0, 1.0], "counts": [1, 1]},
        {"name": "x", "edges": [1.0, 0.0], "counts": [1, 1, 1]},
        {"name": "x", "edges": [0.0], "counts": [0, 0]},
        {"name": "x", "edges": [float("nan")], "counts": [1, 1]},
    ],
)
def test_numeric_rejects_bad_reference(ref: dict[str, Any]) -> None:
    with pytest.raises(StreamError):
        drift_tests.for_histogram(ref, 100, 1e-5, 0.5)


def test_alarm_hysteresis_and_cooldown() -> None:
    alarm = Alarm()
    assert alarm.step(fired=True, calm=False, cooldown=3)  # the rising edge
    assert not alarm.step(fired=True, calm=False, cooldown=3)  # still in drift: once only
    assert not alarm.step(fired=False, calm=False, cooldown=3)  # below the threshold, not calm: held
    for _ in range(2):
        assert not alarm.step(fired=False, calm=True, cooldown=3)
    assert not alarm.step(fired=False, calm=False, cooldown=3)  # a restless check restarts the count
    assert not alarm.armed
    for _ in range(3):
        assert not alarm.step(fired=False, calm=True, cooldown=3)
    assert alarm.armed and alarm.step(fired=True, calm=False, cooldown=3)
    zero = Alarm(armed=False)
    assert not zero.step(fired=True, calm=False, cooldown=0)  # cool-down 0 still needs one calm check
    assert not zero.step(fired=False, calm=True, cooldown=0) and zero.armed


# -- reference profiles -------------------------------------------------------------------------------


def test_profile_counts_strings_and_booleans_and_histograms_numbers() -> None:
    rows = [{"x": float(i), "flag": i % 4 != 0, "kind": "ab"[i % 2], "n": None} for i in range(100)]
    profile = build_profile(rows, [0.5] * 100, ("x", "flag", "kind"), labels=["p", "q", "p", "p"] * 25)
    assert [h["name"] for h in profile["features"]] == ["x"]
    cats = {c["name"]: c for c in profile["categories"]}
    assert cats["flag"] == {"name": "flag", "values": ["true", "false"], "counts": [75, 25]}
    assert cats["kind"]["values"] == ["a", "b"] and cats["kind"]["counts"] == [50, 50]
    assert cats[LABEL] == {"name": LABEL, "values": ["p", "q"], "counts": [75, 25]}
    assert profile["size"] == 100 and profile["prediction"]["name"] == SCORE
    # integer-coded categories on request; a missing value is counted as null
    forced = profile_from_columns({"code": [1, 2, 2, None]}, [], categorical={"code"})
    assert (
        forced["categories"] == [{"name": "code", "values": ["2", "1", "null"], "counts": [2, 1, 1]}]
        and forced["prediction"] is None
    )
    assert codec.decode(
        codec.encode("model_version", _model_version("detector", 1, rows, [0.5] * 100)), "model_version"
    )


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
        monitor=["value", "flag", "kind"],  # numeric, binary, categorical
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
        "reference": build_profile(rows, scores, PROFILED, labels=_labels(model, len(rows))),
        "created_ts": 1_700_000_000_000,
    }


def _labels(model: str, n: int) -> list[str] | None:
    """A multiclass model's predicted labels on its reference: "a" nine times in ten, else "b"."""
    if model not in PROJECT.models or PROJECT.models[model].task != "multiclass":
        return None
    return ["b" if i % 10 == 0 else "a" for i in range(n)]


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


def test_step_alerts_after_shift_with_the_right_input(settings: DriftSettings) -> None:
    rng = np.random.default_rng(42)
    producer, points = FakeProducer(), []
    step = _step(settings, producer, points)
    _publish(step, rng, "detector", 1, 3000)
    _feed(step, "detector", 1, _rows(rng, 1500), rng.random(1500), 0)
    step.flush()
    assert producer.produced == []
    assert len(points) == 1500 // 50
    model, point = points[-1]
    assert model == "detector" and point["version"] == 1 and point["trigger_event_id"] == "e01499"
    # The monitored inputs, each by its type, and the output: level is profiled but not monitored.
    assert set(point) == {"ts", "version", "trigger_event_id", "value", "flag", "kind", SCORE}
    assert point["ts"] == 1_700_000_123_000

    _feed(step, "detector", 1, _rows(rng, 1500, value_mean=80.0, level_mean=90.0), rng.random(1500), 1500)
    alerts = producer.alerts()
    assert [a["feature"] for a in alerts] == ["value"]
    alert = alerts[0]
    topic, _, key = producer.produced[0]
    assert topic == "drift-alerts" and key == b"detector"
    assert alert["model"] == "detector" and alert["version"] == 1 and alert["statistic"] in ("psi", "ks")
    assert alert["kind"] == "input" and alert["feature_type"] == "numeric" and alert["arm"] == "champion"
    assert alert["value"] > alert["threshold"] and alert["false_alarm_rate"] == 1e-5
    assert alert["estimate_before"] == pytest.approx(50, abs=2) and alert["estimate_after"] > 52
    assert alert["window_size"] == 500 and alert["reference_size"] == 3000
    trigger = int(alert["trigger_event_id"].removeprefix("e"))
    assert 1500 <= trigger < 1500 + 500 and (trigger + 1) % 50 == 0
    assert alert["ts"] == 1_700_000_123_000 and len(alert["alert_id"]) == 32


def test_binary_and_categorical_inputs_alert_by_their_type(settings: DriftSettings) -> None:
    rng = np.random.default_rng(12)
    producer = FakeProducer()
    step = _step(settings, producer)
    _publish(step, rng, "detector", 1, 3000)
    _feed(step, "detector", 1, _rows(rng, 1000), rng.random(1000), 0)
    rows = _rows(rng, 1000)
    for i, row in enumerate(rows):
        row["flag"] = bool(rng.random() < 0.4)
        row["kind"] = "b" if i % 3 == 0 else "a"  # a value the reference never saw
    _feed(step, "detector", 1, rows, rng.random(1000), 1000)
    alerts = {a["feature"]: a for a in producer.alerts()}
    assert set(alerts) == {"flag", "kind"}
    flag, kind = alerts["flag"], alerts["kind"]
    assert (flag["feature_type"], flag["statistic"]) == ("binary", "proportion")
    assert flag["estimate_before"] == pytest.approx(0.75, abs=0.03) and flag["estimate_after"] < 0.7
    assert flag["p_value"] < 1e-5
    assert (kind["feature_type"], kind["statistic"]) == ("categorical", "chi2")


def test_each_model_alerts_on_its_own_inputs_and_output(settings: DriftSettings) -> None:
    rng = np.random.default_rng(17)
    producer, points = FakeProducer(), []
    step = _step(settings, producer, points)
    # Reference outputs: the estimator predicts around 10 minutes; the sorter predicts mostly "a".
    _publish(step, rng, "detector", 1, 2000)
    _publish(step, rng, "estimator", 4, 2000, scores=rng.normal(10, 2, 2000))
    _publish(step, rng, "sorter", 2, 2000, scores=rng.uniform(0.8, 1.0, 2000))
    assert step.reference("sorter").categories[LABEL]["values"] == ["a", "b"]  # type: ignore[union-attr]

    def feed_all(n: int, start: int, *, shifted: bool) -> None:
        # One stream of readings, scored by all three models; after the shift, value and level move,
        # the estimator predicts longer and the sorter predicts "b" as often as "a".
        rows = _rows(rng, n, value_mean=85.0 if shifted else 50.0, level_mean=80.0 if shifted else 50.0)
        minutes = rng.normal(25 if shifted else 10, 2, n)
        labels = rng.random(n) < (0.5 if shifted else 0.9)
        detector = rng.random(n)
        for i, row in enumerate(rows):
            for model, version, score in (
                ("detector", 1, detector[i]),
                ("estimator", 4, minutes[i]),
                ("sorter", 2, 0.9),
            ):
                rec = _prediction(model, version, row, float(score), start + i)
                if model == "sorter":
                    rec["label"] = "a" if labels[i] else "b"
                step.handle(_incoming("prediction", rec))
        step.flush()

    feed_all(1000, 0, shifted=False)
    assert producer.produced == []
    assert {m for m, _ in points} == {"detector", "estimator", "sorter"}
    feed_all(1000, 1000, shifted=True)
    alerts = producer.alerts()
    raised = sorted((a["model"], a["version"], a["feature"]) for a in alerts)
    assert raised == [
        ("detector", 1, "value"),
        ("estimator", 4, SCORE),
        ("estimator", 4, "level"),
        ("sorter", 2, SCORE),
        ("sorter", 2, "value"),
    ]
    outputs = {a["model"]: a for a in alerts if a["feature"] == SCORE}
    assert outputs["estimator"]["kind"] == "output" and outputs["estimator"]["feature_type"] == "regression"
    assert outputs["sorter"]["feature_type"] == "multiclass" and outputs["sorter"]["statistic"] == "chi2"
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


def test_a_version_without_reference_is_compared_with_none(
    settings: DriftSettings, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(5)
    producer, points = FakeProducer(), []
    step = _step(settings, producer, points)
    _publish(step, rng, "detector", 1, 1000)
    _publish(step, rng, "detector", 2, 1000, 150.0)  # version 2 was trained on much larger values
    assert step.reference("detector").version == 2  # type: ignore[union-attr]
    _publish(step, rng, "detector", 1, 1000)  # a replay of version 1 does not make it current again
    assert step.reference("detector").version == 2  # type: ignore[union-attr]

    # Version 3 has no reference: its predictions (values like v1's, scores of its own) are compared with
    # neither v1's nor v2's reference.
    with caplog.at_level(logging.WARNING, "streams.drift"):
        _feed(step, "detector", 3, _rows(rng, 1000, 50.0), rng.random(1000) * 9, 0)
    assert producer.produced == [] and points == []
    assert "model detector v3 has no reference profile" in caplog.text
    # Its inputs still filled the model's windows: version 2's first check compares them with v2's.
    _feed(step, "detector", 2, _rows(rng, 50, 50.0), rng.random(50), 1000)
    assert [(a["feature"], a["version"]) for a in producer.alerts()] == [("value", 2)]
    # Version 1's predictions are compared with v1's own reference.
    producer.produced.clear()
    _feed(step, "detector", 1, _rows(rng, 1000, 50.0), rng.random(1000), 2000)
    assert producer.produced == []


def test_armed_state_outlives_many_versions(settings: DriftSettings) -> None:
    rng = np.random.default_rng(6)
    producer = FakeProducer()
    step = _step(settings, producer)
    _publish(step, rng, "detector", 1, 1000)
    _feed(step, "detector", 1, _rows(rng, 600, 90.0), rng.random(600), 0)
    assert [a["feature"] for a in producer.alerts()] == ["value"]
    # Ten other versions serve in turn, then version 1 again, its drift unchanged: not raised again.
    for v in range(2, 12):
        _publish(step, rng, "detector", v, 1000, 90.0)
        _feed(step, "detector", v, _rows(rng, 100, 90.0), rng.random(100), 600 + 100 * v)
    _feed(step, "detector", 1, _rows(rng, 600, 90.0), rng.random(600), 5000)
    assert [a["feature"] for a in producer.alerts()] == ["value"]


def test_policy_sets_rate_and_cooldown(settings: DriftSettings) -> None:
    rng = np.random.default_rng(7)
    producer = FakeProducer()
    policy = Policy(drift=Drift(false_alarm_rate=1e-3, cooldown_checks=2))
    project = replace(PROJECT, models={"detector": replace(PROJECT.models["detector"], policy=policy)})
    step = DriftStep(settings, project, producer, "drift-alerts", None)
    _publish(step, rng, "detector", 1, 2000)
    _feed(step, "detector", 1, _rows(rng, 600, 90.0), rng.random(600), 0)
    _feed(step, "detector", 1, _rows(rng, 700, 50.0), rng.random(700), 600)  # calm: re-armed after 2
    _feed(step, "detector", 1, _rows(rng, 600, 90.0), rng.random(600), 1300)
    alerts = [a for a in producer.alerts() if a["feature"] == "value"]
    assert len(alerts) == 2 and {a["false_alarm_rate"] for a in alerts} == {1e-3}
    assert len({a["alert_id"] for a in alerts}) == 2


def _run(step: DriftStep, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
    for i, (name, rec) in enumerate(records):
        step.handle(_incoming(name, rec, i))


def test_snapshot_and_restore_give_the_alerts_of_an_uninterrupted_run(settings: DriftSettings) -> None:
    rng = np.random.default_rng(21)
    records: list[tuple[str, dict[str, Any]]] = []
    for v, mean in ((1, 50.0), (2, 60.0)):
        records.append(
            ("model_version", _model_version("detector", v, _rows(rng, 1500, mean), list(rng.random(1500))))
        )
    for i, row in enumerate(
        _rows(rng, 800) + _rows(rng, 800, 80.0) + _rows(rng, 800) + _rows(rng, 800, 80.0)
    ):
        version = 1 if i < 1700 else 2
        records.append(("prediction", _prediction("detector", version, row, float(rng.random()), i)))
    whole = FakeProducer()
    _run(_step(settings, whole), records)
    assert len(whole.alerts()) >= 2

    # Killed at arbitrary points: each restart restores the snapshot of the last checkpoint, after the
    # references were replayed (as `drift_service.run` does), and goes on from the records after it.
    parts = FakeProducer()
    step = _step(settings, parts)
    cut_points = [0, 500, 1333, 1780, 2550, len(records)]
    for start, end in itertools.pairwise(cut_points):
        _run(step, records[start:end])
        snapshot = step.snapshot()
        step = _step(settings, parts)
        _run(step, [r for r in records if r[0] == "model_version"])
        step.restore(snapshot)
    strip = [{k: v for k, v in a.items() if k != "ts"} for a in parts.alerts()]
    assert strip == [{k: v for k, v in a.items() if k != "ts"} for a in whole.alerts()]


def test_step_bad_records_raise_and_leave_windows_alone(settings: DriftSettings) -> None:
    rng = np.random.default_rng(9)
    step = _step(settings)
    _publish(step, rng, "detector", 1, 1000)
    row = _rows(rng, 1)[0]
    step.handle(_incoming("prediction", _prediction("detector", 1, row, 0.5, 0)))
    bad = dict(row, flag="yes")
    with pytest.raises(StreamError, match=r"model detector v1: 'flag' is not binary"):
        step.handle(_incoming("prediction", _prediction("detector", 1, bad, 0.5, 1)))
    windows = step.windows("detector")
    assert windows is not None and {len(w) for w in windows.inputs.values()} == {1}
    assert windows.seen == 1
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
    windows = step.windows("detector")
    assert windows is not None
    assert len(windows.outputs[2]) == 1 and len(windows.outputs[1]) == 300  # v1's scores are not v2's
    assert {len(w) for w in windows.inputs.values()} == {301}  # inputs are inputs, whichever version


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
