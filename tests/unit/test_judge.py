"""The canary judge's step without a broker: joins, losses, rules, verdicts and actions, concept drift,
bad input, and a snapshot taken mid-stream that resumes exactly where it was."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from infra.errors import StreamError
from infra.processor import Incoming
from schemas.definitions import Labels, Model, Project, Source
from schemas.policy import Canary, Drift, Policy
from schemas.registry import register_schemas
from streams import outcomes
from streams.judge import JudgeSettings, JudgeStep
from streams.judging import MemoryEmitter
from streams.verdict import SHADOW, Judgement

REQUESTS: dict[str, Any] = {
    "type": "record",
    "name": "Ask",
    "namespace": "tests.judge",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "unit", "type": "string"},
        {"name": "x", "type": "double"},
        {"name": "ts", "type": "long"},
    ],
}
OUTCOMES: dict[str, Any] = {
    "type": "record",
    "name": "Answer",
    "namespace": "tests.judge",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "unit", "type": "string"},
        {"name": "y", "type": "boolean"},
        {"name": "ts", "type": "long"},
    ],
}
POLICY = Canary(
    min_labels=100, min_duration_s=0, max_duration_s=3600, margin=0.02, promote=True, rollback=True
)


def project(policy: Canary = POLICY, *, concept: bool = True, max_delay: str = "10s") -> Project:
    asks = Source("asks", REQUESTS, key="unit", event_time="ts")
    answers = Source("answers", OUTCOMES, key="unit", event_time="ts")
    model = Model(
        "scorer",
        "binary",
        asks,
        ["x"],
        labels=Labels("answer", answers, "event_id", "y", "binary", max_delay=max_delay),
        learner="river.linear_model:LogisticRegression",
        policy=Policy(canary=policy, drift=Drift(concept=concept)),
    )
    p = Project.of("judged", [model])
    register_schemas(p)
    return p


class Feed:
    """Builds the judge's incoming records with increasing offsets and stream time."""

    def __init__(self, step: JudgeStep) -> None:
        self.step = step
        self.offset = 0
        self.now = 1_000_000

    def _item(self, record: str, value: dict[str, Any], topic: str = "t") -> Incoming:
        self.offset += 1
        return Incoming(record, value, b"k", topic, 0, self.offset, self.now)

    def version(self, v: int, parent: int | None = None, trigger: str | None = None) -> None:
        value = {"model": "scorer", "version": v, "parent_version": parent, "trigger": trigger}
        self.step.handle(self._item("model_version", value))

    def deploy(self, action: str, version: int | None, weight: float = 0.0) -> None:
        value = {"model": "scorer", "action": action, "version": version, "weight": weight}
        self.step.handle(self._item("deployment", value))

    def prediction(
        self, event: str, arm: str, version: int, score: float, latency: float = 5.0, model: str = "scorer"
    ) -> None:
        value = {
            "model": model,
            "version": version,
            "arm": arm,
            "event_id": event,
            "score": score,
            "latency_ms": latency,
            "ts": self.now,
        }
        self.step.handle(self._item("prediction", value))

    def label(self, event: str, y: Any) -> None:
        value = {"event_id": event, "unit": "u", "y": y, "ts": self.now}
        self.step.handle(self._item("answers", value, "answers"))

    def tick(self, ms: int = 100) -> None:
        self.now += ms
        self.step.flush()


def _stream(seed: int, n: int, candidate_noise: float) -> Iterator[tuple[str, float, float, bool]]:
    """(event id, champion score, candidate score, label): a calibrated champion, a candidate with
    noise on the logit (0: as good)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = float(rng.beta(2, 5))
        y = bool(rng.random() < p)
        logit = math.log(p / (1 - p)) + candidate_noise * float(rng.normal())
        yield f"e{i}", p, 1 / (1 + math.exp(-logit)), y


def _step(p: Project | None = None) -> tuple[JudgeStep, MemoryEmitter, Feed]:
    out = MemoryEmitter()
    step = JudgeStep(JudgeSettings(), p or project(), out)
    feed = Feed(step)
    feed.version(1)
    feed.version(2)
    return step, out, feed


def finals(out: MemoryEmitter) -> list[dict[str, Any]]:
    return [v for v in out.of("canary-verdicts") if v["final"]]


def run_shadow(feed: Feed, n: int, noise: float, seed: int = 1, batch: int = 20) -> None:
    for i, (event, p, q, y) in enumerate(_stream(seed, n, noise)):
        feed.prediction(event, "champion", 1, p)
        feed.prediction(event, "shadow", 2, q)
        feed.label(event, y)
        if i % batch == batch - 1:
            feed.tick()


def run_canary(feed: Feed, n: int, noise: float, seed: int = 2, share: float = 0.3) -> None:
    rng = np.random.default_rng(seed + 100)
    for i, (event, p, q, y) in enumerate(_stream(seed, n, noise)):
        if rng.random() < share:
            feed.prediction(event, "canary", 2, q)
        else:
            feed.prediction(event, "champion", 1, p)
        feed.label(event, y)
        if i % 20 == 19:
            feed.tick()


def test_losses_per_task() -> None:
    assert outcomes.loss("binary", {"score": 0.8}, True) == pytest.approx(-math.log(0.8))
    assert outcomes.loss("binary", {"score": 0.0}, True) == pytest.approx(-math.log(outcomes.EPS))
    assert outcomes.loss("regression", {"score": 3.0}, 1.5) == pytest.approx(2.25)
    probs = {"a": 0.7, "b": 0.3}
    assert outcomes.loss("multiclass", {"score": 0.7, "probabilities": probs}, "b") == pytest.approx(
        -math.log(0.3)
    )
    assert outcomes.loss("multiclass", {"score": 0.7, "label": "a"}, "a") == 0.0
    assert outcomes.loss("multiclass", {"score": 0.7, "label": "a"}, "b") == 1.0
    assert outcomes.output_error("binary", {"score": float("nan")}) is not None
    assert outcomes.output_error("binary", {"score": 1.5}) is not None
    assert (
        outcomes.output_error("multiclass", {"score": 0.5, "probabilities": {"a": 0.5, "b": 0.2}}) is not None
    )
    assert outcomes.output_error("regression", {"score": -4.0}) is None
    # the concept monitor watches a regressor's absolute error, any other task's loss as it is
    assert outcomes.concept_signal("regression", 2.25) == pytest.approx(1.5)
    assert outcomes.concept_signal("binary", 0.7) == 0.7


@pytest.mark.parametrize(
    ("task", "raw"),
    [("binary", "yes"), ("binary", 2), ("regression", "1.5"), ("regression", True), ("multiclass", 1.5)],
)
def test_targets_of_the_wrong_type_are_refused(task: str, raw: Any) -> None:
    with pytest.raises(StreamError, match=r"^wrong_type"):
        outcomes.target(task, raw)


def test_a_better_shadow_passes_and_is_promoted_once() -> None:
    _, out, feed = _step()
    feed.deploy("shadow", 2)
    run_shadow(feed, 3000, noise=0.2)  # about the champion's equal: non-inferior within 0.02
    done = finals(out)
    assert len(done) == 1, done
    v = done[0]
    assert (v["outcome"], v["rule"], v["arm"], v["version"], v["champion_version"]) == (
        "pass",
        "non_inferiority",
        "shadow",
        2,
        1,
    )
    assert v["n"] == v["n_champion"] >= 100 and v["upper"] < 0.02 and v["action"] == "promote"
    deployments = out.of("deployments")
    assert [(d["action"], d["version"], d["source"]) for d in deployments] == [("promote", 2, "judge")]
    assert v["verdict_id"] in deployments[0]["reason"] and deployments[0]["id"]
    interim = [r for r in out.of("canary-verdicts") if not r["final"]]
    assert interim and all(r["outcome"] in ("no_data", "inconclusive") for r in interim)


def test_a_worse_canary_fails_and_is_ended() -> None:
    _, out, feed = _step()
    feed.deploy("canary", 2, 0.3)
    run_canary(feed, 4000, noise=2.0)
    done = finals(out)
    assert len(done) == 1, done
    v = done[0]
    assert (v["outcome"], v["rule"], v["arm"], v["action"]) == ("fail", "inferiority", "canary", "rollback")
    assert v["lower"] > 0 and v["n_champion"] > v["n"] >= 100
    assert [(d["action"], d["version"], d["weight"]) for d in out.of("deployments")] == [("canary", 2, 0.0)]
    # Reading its own deployment back ends nothing twice; later canary predictions are not judged.
    feed.deploy("canary", 2, 0.0)
    run_canary(feed, 300, noise=2.0, seed=9)
    assert len(finals(out)) == 1


def test_report_only_policy_publishes_no_deployment() -> None:
    _, out, feed = _step(project(Canary(min_labels=100, min_duration_s=0, margin=0.02)))
    run_shadow(feed, 2000, noise=0.2)
    assert [v["action"] for v in finals(out)] == [None]
    assert out.of("deployments") == []


def test_the_end_of_a_deployment_gives_a_final_verdict() -> None:
    _, out, feed = _step()
    feed.deploy("canary", 2, 0.3)
    run_canary(feed, 60, noise=0.0)
    feed.deploy("canary", 2, 0.0)
    feed.tick()
    done = finals(out)
    assert [(v["outcome"], v["rule"], v["action"]) for v in done] == [("inconclusive", "ended", None)]


def test_rules_order_no_data_durations_and_timeout() -> None:
    policy = Canary(min_labels=10, min_duration_s=5, max_duration_s=60)
    j = Judgement("m", SHADOW, 2, policy, started_ms=0)
    assert (j.decide(1000).outcome, j.decide(1000).rule) == ("no_data", "min_labels")
    for i in range(5):
        j.pair(0.5 + 0.01 * i, 0.5, 1000)
    assert (j.decide(2000).outcome, j.decide(2000).rule) == ("inconclusive", "min_duration")
    assert (j.decide(6000).outcome, j.decide(6000).rule) == ("inconclusive", "min_labels")
    d = j.decide(60_000)
    assert (d.outcome, d.rule, d.final) == ("inconclusive", "max_duration", True)


def test_a_guardrail_fails_a_candidate_without_labels() -> None:
    _, out, feed = _step()
    feed.deploy("canary", 2, 0.5)
    for i in range(600):
        feed.prediction(f"e{i}", "champion", 1, 0.3, latency=5.0)
        feed.prediction(f"f{i}", "canary", 2, 0.3 + (i % 7) / 100, latency=50.0)
        if i % 50 == 49:
            feed.tick()
    done = finals(out)
    assert [(v["outcome"], v["rule"]) for v in done] == [("fail", "guardrail:latency_ratio")]
    assert done[0]["guardrails"]["latency_ratio"] > 3


def test_bad_input_is_refused_and_changes_no_verdict() -> None:
    _, clean_out, clean_feed = _step()
    _, dirty_out, dirty_feed = _step()
    for feed in (clean_feed, dirty_feed):
        feed.deploy("shadow", 2)
    refused: list[str] = []
    for i, (event, p, q, y) in enumerate(_stream(5, 1500, 0.2)):
        for feed in (clean_feed, dirty_feed):
            feed.prediction(event, "champion", 1, p)
            feed.prediction(event, "shadow", 2, q)
            feed.label(event, y)
        if i % 100 == 7:
            for record, args in (
                ("label", (event, not y)),  # duplicate
                ("label", (f"x{i}", "yes")),  # wrong type
            ):
                with pytest.raises(StreamError) as exc:
                    getattr(dirty_feed, record)(*args)
                refused.append(str(exc.value))
            dirty_feed.prediction(f"z{i}", "champion", 99, 0.5)  # a version never published: held
            dirty_feed.label(f"nobody{i}", True)  # no prediction will come
        if i % 20 == 19:
            clean_feed.tick()
            dirty_feed.tick()
    assert any("duplicate_label" in r for r in refused)
    assert any("wrong_type" in r for r in refused)
    assert len(refused) == 30
    # predictions read past the labels' max_delay (10 s) and the wait for a version (30 s) of stream time
    dirty_feed.now += 40_000
    dirty_feed.prediction("later", "champion", 1, 0.5)
    dirty_feed.tick()
    letters = dirty_out.letters
    unknown = [lt for lt in letters if lt.error.startswith("unknown_event")]
    assert len(unknown) == 15 and all(lt.value and lt.source_topic == "answers" for lt in unknown)
    unpublished = [lt for lt in letters if lt.error.startswith("unknown_version")]
    assert len(unpublished) == 15 and all(lt.source_topic == "t" and "v99" in lt.error for lt in unpublished)
    assert len(letters) == 30

    def decisive(out: MemoryEmitter) -> list[tuple[Any, ...]]:
        return [(v["outcome"], v["rule"], v["n"], v["estimate"], v["upper"]) for v in finals(out)]

    assert decisive(clean_out) == decisive(dirty_out) and len(decisive(clean_out)) == 1


def test_snapshot_mid_stream_resumes_the_same_decision() -> None:
    _, whole_out, whole_feed = _step()
    whole_feed.deploy("canary", 2, 0.3)
    run_canary(whole_feed, 4000, noise=1.2, seed=3)

    first, first_out, first_feed = _step()
    first_feed.deploy("canary", 2, 0.3)
    run_canary(first_feed, 1500, noise=1.2, seed=3)
    saved = first.snapshot()
    second_out = MemoryEmitter()
    second = JudgeStep(JudgeSettings(), project(), second_out)
    second.restore(saved)
    feed = Feed(second)
    feed.offset, feed.now = first_feed.offset, first_feed.now
    # the rest of the same stream
    rng = np.random.default_rng(103)
    for i, (event, p, q, y) in enumerate(_stream(3, 4000, 1.2)):
        canary = rng.random() < 0.3
        if i < 1500:
            continue
        if canary:
            feed.prediction(event, "canary", 2, q)
        else:
            feed.prediction(event, "champion", 1, p)
        feed.label(event, y)
        if i % 20 == 19:
            feed.tick()

    def decisive(out: MemoryEmitter) -> list[tuple[Any, ...]]:
        return [(v["outcome"], v["rule"], v["n"], v["n_champion"], v["estimate"]) for v in finals(out)]

    assert len(decisive(whole_out)) == 1
    assert decisive(first_out) + decisive(second_out) == decisive(whole_out)


def test_concept_drift_of_the_champion_raises_one_alert() -> None:
    _, out, feed = _step(project(concept=True))
    rng = np.random.default_rng(8)
    for i in range(6000):
        p = float(rng.beta(2, 5))
        y = bool(rng.random() < p)
        if i >= 3000:
            y = not y  # the concept flips: the champion's losses rise
        feed.prediction(f"e{i}", "champion", 1, p)
        feed.label(f"e{i}", y)
        if i % 50 == 49:
            feed.tick()
    alerts = out.of("drift-alerts")
    assert alerts, "no concept-drift alert"
    a = alerts[0]
    assert (a["kind"], a["feature"], a["arm"], a["model"], a["version"]) == (
        "concept",
        "loss",
        "champion",
        "scorer",
        1,
    )
    assert a["statistic"] in ("adwin", "page_hinkley")
    assert a["estimate_after"] > a["estimate_before"] and a["value"] == a["estimate_after"]
    assert a["window_size"] > 3000 and all(int(x["trigger_event_id"][1:]) >= 3000 for x in alerts)

    _, quiet_out, quiet_feed = _step(project(concept=False))
    for i in range(3000, 3500):
        quiet_feed.prediction(f"e{i}", "champion", 1, 0.9)
        quiet_feed.label(f"e{i}", False)
    quiet_feed.tick()
    assert quiet_out.of("drift-alerts") == []


class Consumer:
    """What the flow control asks of a consumer: its assignment, pause and resume (recorded)."""

    def __init__(self, topics: list[str]) -> None:
        from confluent_kafka import TopicPartition

        self.parts = [TopicPartition(t, 0) for t in topics]
        self.paused: list[str] = []

    def assignment(self) -> list[Any]:
        return self.parts

    def pause(self, parts: list[Any]) -> None:
        self.paused.extend(tp.topic for tp in parts)

    def resume(self, parts: list[Any]) -> None:
        pass


def test_labels_of_a_model_never_scored_are_counted_not_held_and_pause_nothing() -> None:
    p = project(max_delay="1d")
    scorer = p.models["scorer"]
    assert scorer.labels is not None
    idle = Model(
        "idle",
        "binary",
        scorer.request,
        ["x"],
        labels=Labels("idle_answer", scorer.labels.source, "event_id", "y", "binary", max_delay="1d"),
        learner="river.linear_model:LogisticRegression",
    )
    both = Project.of("judged", [scorer, idle])
    register_schemas(both)
    out = MemoryEmitter()
    step = JudgeStep(JudgeSettings(judge_max_pending=100), both, out)
    consumer = Consumer(list(step.topics()))
    step.follow(None, consumer)  # type: ignore[arg-type]
    feed = Feed(step)
    feed.version(1)
    for i, (event, p_, _, y) in enumerate(_stream(4, 600, 0.0)):
        feed.prediction(event, "champion", 1, p_)
        feed.label(event, y)
        if i % 20 == 19:
            feed.tick()
    # The idle model has no version and no prediction: none of its 600 labels is held, none is
    # dead-lettered (join_full), and it never pauses the labels topic the scorer reads as well.
    assert len(step.models["idle"].joins) == 0 and step.models["idle"].not_served == 600
    assert out.letters == [] and consumer.paused == []
    assert step.models["scorer"].not_served == 0 and len(step.models["scorer"].joins.done) == 100
    assert set(step.waiting().values()) == {0}
    # Labels of the scorer read ahead of its predictions still pause their topic (and only it).
    for i in range(80):
        feed.label(f"ahead{i}", True)
    feed.tick()
    labels_topic = next(t for t, record in step.topics().items() if record == "answers")
    assert consumer.paused == [labels_topic] and step.waiting()[labels_topic] == 80
    assert len(step.models["idle"].joins) == 80  # until predictions pass them: one of its may come
    feed.now += 100
    for i in range(80):
        feed.prediction(f"ahead{i}", "champion", 1, 0.2)
    feed.tick()
    assert step.waiting()[labels_topic] == 0 and len(step.models["idle"].joins) == 0
    assert step.models["idle"].not_served == 680 and out.letters == []


def test_a_prediction_read_before_its_version_waits_for_it() -> None:
    out = MemoryEmitter()
    step = JudgeStep(JudgeSettings(judge_max_held=10, judge_version_wait_records=400), project(), out)
    feed = Feed(step)
    feed.version(1)
    feed.deploy("shadow", 3)
    for event, p, q, y in _stream(6, 8, 0.1):
        feed.prediction(event, "champion", 1, p)
        feed.prediction(event, "shadow", 3, q)  # read before version 3's record
        feed.label(event, y)
    feed.tick()
    assert out.letters == []
    feed.version(3, parent=1)  # the models topic catches up: the 8 are scored, none dead-lettered
    feed.tick()
    judged = step.models["scorer"].judgements[(SHADOW, 3)]
    assert judged.stats.n == 8 and out.letters == []
    # A version never published: beyond 10 held the oldest goes, the rest once 400 records have passed.
    for i in range(15):
        feed.prediction(f"n{i}", "champion", 99, 0.5)
    assert [lt.error.startswith("unknown_version") for lt in out.letters] == [True] * 5
    for event, p, _, y in _stream(7, 250, 0.0):
        feed.prediction(f"m{event}", "champion", 1, p)
        feed.label(f"m{event}", y)
    feed.tick()
    assert len(out.letters) == 15 and all("v99" in lt.error for lt in out.letters)
    assert [lt.offset for lt in out.letters] == sorted(lt.offset for lt in out.letters)


def _lineage_run(feed: Feed, events: range, *, every: int = 300, flip_at: int = 2990) -> None:
    """Champion losses of a learner published every ``every`` labels (each version the next of its
    parent); the concept flips at ``flip_at``, ten labels before a version is replaced."""
    rng = np.random.default_rng(9)
    draws = [(float(rng.beta(2, 5)), float(rng.random())) for _ in range(events.stop)]
    for i in events:
        version = 1 + i // every
        if i % every == 0 and i > 0:
            feed.version(version, parent=version - 1, trigger="schedule")
        p, r = draws[i]
        y = (r < p) != (i >= flip_at)
        feed.prediction(f"e{i}", "champion", version, p)
        feed.label(f"e{i}", y)
        if i % 50 == 49:
            feed.tick()


def _lineage_step() -> tuple[JudgeStep, MemoryEmitter, Feed]:
    out = MemoryEmitter()
    step = JudgeStep(JudgeSettings(), project(concept=True), out)
    feed = Feed(step)
    feed.version(1)
    return step, out, feed


def test_the_concept_monitor_follows_the_lineage_across_versions() -> None:
    step, out, feed = _lineage_step()
    _lineage_run(feed, range(6000))
    alerts = out.of("drift-alerts")
    # Each version serves 300 labels; the one serving at the change saw 10 of the new concept, the next
    # ones only the new concept: only a detector that saw the stream across versions finds the rise.
    assert alerts, "no concept-drift alert"
    first = alerts[0]
    assert first["version"] >= 11 and int(first["trigger_event_id"][1:]) >= 2990
    assert first["estimate_after"] > first["estimate_before"] and first["window_size"] > 2990
    assert set(step.chains["scorer"].values()) == {1}

    # A refresh after the alert (its trigger names it) starts a lineage and a monitor of its own.
    feed.version(50, parent=20, trigger=f"concept drift alert {first['alert_id']}")
    feed.version(51, parent=50, trigger="schedule")
    assert step.chains["scorer"][50] == 50 and step.chains["scorer"][51] == 50
    feed.prediction("r0", "champion", 51, 0.3)
    feed.label("r0", False)
    fresh = step.models["scorer"].monitors[50]
    assert fresh.seen == 1 and step.models["scorer"].monitors[1].seen == 6000

    # Killed mid-stream and restored: the same alerts (the lineage's monitor is in the snapshot).
    first_step, first_out, first_feed = _lineage_step()
    _lineage_run(first_feed, range(2950))
    second_out = MemoryEmitter()
    second = JudgeStep(JudgeSettings(), project(concept=True), second_out)
    second.restore(first_step.snapshot())
    resumed = Feed(second)
    resumed.offset, resumed.now = first_feed.offset, first_feed.now
    _lineage_run(resumed, range(2950, 6000))
    ids = [a["alert_id"] for a in first_out.of("drift-alerts") + second_out.of("drift-alerts")]
    assert ids == [a["alert_id"] for a in alerts]
