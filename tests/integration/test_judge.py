"""``tide judge`` as a real process against the embedded broker: a worse canary failed and ended, an
equal shadow passed and promoted, bad input dead-lettered without touching the verdict, and a judge
killed mid-stream (SIGKILL) and restarted that repeats and loses no verdict and no alert."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, Message, Producer

from infra.kafka import make_producer, reader_from_beginning
from infra.processor import Incoming
from infra.settings import CommonSettings
from infra.topics import TOPICS, prefixed, topic
from schemas import codec
from schemas.definitions import Labels, Model, Project, Source
from schemas.policy import Canary, Drift, Policy
from schemas.registry import register_schemas
from streams.judge import JudgeSettings, JudgeStep
from streams.judging import MemoryEmitter
from tide.plan import apply
from tide.processes import Services, wait_until

pytestmark = pytest.mark.integration

MODEL = "scorer"
ASKS: dict[str, Any] = {
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
ANSWERS: dict[str, Any] = {
    "type": "record",
    "name": "Answer",
    "namespace": "tests.judge",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "unit", "type": "string"},
        {"name": "y", "type": "int"},  # 0 or 1 for the binary task; any other value is of the wrong type
        {"name": "ts", "type": "long"},
    ],
}


def definitions(policy: Canary, *, max_delay: str = "1h") -> Project:
    asks = Source("asks", ASKS, key="unit", event_time="ts", partitions=1)
    answers = Source("answers", ANSWERS, key="unit", event_time="ts", partitions=1)
    model = Model(
        MODEL,
        "binary",
        asks,
        ["x"],
        labels=Labels("answer", answers, "event_id", "y", "binary", max_delay=max_delay),
        learner="river.linear_model:LogisticRegression",
        policy=Policy(canary=policy, drift=Drift(concept=True)),
    )
    return Project.of("judged", [model])


@pytest.fixture
def judge(settings: CommonSettings, tmp_path: Path) -> Iterator[Services]:
    svc = Services(
        {
            "TIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "TIDE_REDIS_URL": settings.redis_url,
            "TIDE_TOPIC_PREFIX": settings.topic_prefix,
            "TIDE_STATE_DIR": str(tmp_path),
            "TIDE_JUDGE_GROUP": f"{settings.topic_prefix}judge",
            "TIDE_JUDGE_VERDICT_EVERY_S": "0.5",
            "TIDE_JUDGE_CHECKPOINT_INTERVAL_S": "0.2",
            "TIDE_JUDGE_BATCH": "200",
        },
        tmp_path / "logs",
    )
    yield svc
    svc.stop_all()


class Stream:
    """Produces the judge's inputs: model versions, deployments, predictions and labels."""

    def __init__(self, settings: CommonSettings, project: Project) -> None:
        apply(settings, project)
        register_schemas(project)
        self.settings = settings
        self.producer: Producer = make_producer(settings)
        self.labels_topic = prefixed(settings, "answers")
        self.sent: list[tuple[str, dict[str, Any]]] = []  # (record, value), in production order

    def _send(self, name: str, record: str, value: dict[str, Any], key: bytes = b"u") -> None:
        self.producer.produce(name, key=key, value=codec.encode(record, value))
        self.sent.append((record, value))

    def version(self, v: int) -> None:
        record = {
            "model": MODEL,
            "version": v,
            "flavor": "river",
            "task": "binary",
            "artifact": b"",
            "sha256": "0" * 64,
            "feature_names": ["x"],
            "metric_name": "logloss",
            "trained_on": 0,
            "created_ts": int(time.time() * 1000),
        }
        self._send(topic(self.settings, "models"), "model_version", record, MODEL.encode())

    def deploy(self, action: str, version: int | None, weight: float = 0.0) -> None:
        record = {"model": MODEL, "action": action, "version": version, "weight": weight, "ts": 0}
        self._send(topic(self.settings, "deployments"), "deployment", record, MODEL.encode())

    def prediction(self, event: str, arm: str, version: int, score: float) -> None:
        record = {
            "request_id": f"r-{event}-{arm}",
            "event_id": event,
            "model": MODEL,
            "version": version,
            "arm": arm,
            "features": {"x": 0.0},
            "score": score,
            "latency_ms": 2.0,
            "ts": int(time.time() * 1000),
        }
        self._send(topic(self.settings, "predictions"), "prediction", record)

    def label(self, event: str, y: int) -> None:
        record = {"event_id": event, "unit": "u", "y": y, "ts": int(time.time() * 1000)}
        self._send(self.labels_topic, "answers", record)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def events(
    seed: int, start: int, stop: int, noise: float, flip_from: int | None = None
) -> list[tuple[str, float, float, int]]:
    """(event id, calibrated champion score, candidate score with logit noise, label) for events
    ``start``..``stop`` of one seeded stream; labels flip from ``flip_from`` (a new concept)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(stop):
        p = float(rng.beta(2, 5))
        y = int(rng.random() < p)
        q = 1 / (1 + math.exp(-(math.log(p / (1 - p)) + noise * float(rng.normal()))))
        if i >= start:
            if flip_from is not None and i >= flip_from:
                y = 1 - y
            out.append((f"e{i:06d}", p, q, y))
    return out


def canary_share(event: str) -> bool:
    """A sticky 30 % share, as serving's hash would give."""
    return int(event[1:]) * 2654435761 % 100 < 30


def read(settings: CommonSettings, name: str, timeout: float = 5.0) -> list[Message]:
    """Every committed record of Tide's topic ``name`` so far."""
    consumer = reader_from_beginning(
        settings, topic(settings, name), TOPICS[name].partitions, **{"enable.partition.eof": True}
    )
    got: list[Message] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(at_end) < TOPICS[name].partitions and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    got.append(msg)
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
    finally:
        consumer.close()
    return got


def decoded(settings: CommonSettings, name: str) -> list[dict[str, Any]]:
    return [codec.decode(m.value() or b"") for m in read(settings, name)]


def unique(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The last record of each id, in the order of the last ones (latest per key wins)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        seen.pop(r[key], None)
        seen[r[key]] = r
    return list(seen.values())


def finals(settings: CommonSettings) -> list[dict[str, Any]]:
    return [v for v in unique(decoded(settings, "canary-verdicts"), "verdict_id") if v["final"]]


def wait_for_finals(
    settings: CommonSettings, judge: Services, count: int, timeout: float = 120
) -> list[dict[str, Any]]:
    ok = wait_until(lambda: len(finals(settings)) >= count or judge.check_alive(), timeout, interval=1.0)
    assert not judge.check_alive(), judge.log_tail("judge", 40)
    assert ok, f"no final verdict in {timeout} s:\n{judge.log_tail('judge', 40)}"
    return finals(settings)


def test_a_worse_canary_is_failed_and_ended_and_bad_input_is_dead_lettered(
    settings: CommonSettings, judge: Services
) -> None:
    # The noisy candidate's scores differ from the champion's: the score guardrail is opened up so that
    # the confidence sequence decides.
    policy = Canary(
        min_labels=200, min_duration_s=0, margin=0.02, rollback=True, promote=True, max_score_shift=1.0
    )
    stream = Stream(settings, definitions(policy, max_delay="2s"))
    stream.version(1)
    stream.version(2)
    stream.deploy("canary", 2, 0.3)
    for i, (event, p, q, y) in enumerate(events(21, 0, 5000, noise=2.5)):
        if canary_share(event):
            stream.prediction(event, "canary", 2, q)
        else:
            stream.prediction(event, "champion", 1, p)
        stream.label(event, y)
        if i == 100:
            stream.label(event, 1 - y)  # a duplicate
            stream.label("e-x", 2)  # the wrong type for a binary label
            stream.prediction("e-v", "champion", 99, 0.5)  # a version never published
            stream.label("e-nobody", 1)  # an event never scored
            stream.producer.produce(stream.labels_topic, key=b"u", value=b"\x00garbage")
    stream.flush()
    judge.start("judge", "judge")
    done = wait_for_finals(settings, judge, 1)
    assert len(done) == 1
    v = done[0]
    assert (v["outcome"], v["rule"], v["arm"], v["version"], v["champion_version"]) == (
        "fail",
        "inferiority",
        "canary",
        2,
        1,
    )
    assert v["lower"] > 0 and v["action"] == "rollback"
    ours = [d for d in decoded(settings, "deployments") if d.get("source") == "judge"]
    assert [(d["action"], d["version"], d["weight"]) for d in ours] == [("canary", 2, 0.0)]
    assert v["verdict_id"] in (ours[0]["reason"] or "")

    # The unscored event's label expires once the predictions read pass its time by max_delay (2 s).
    time.sleep(2.5)
    stream.prediction("e-later", "champion", 1, 0.5)
    stream.flush()

    def errors() -> list[str]:
        return [dict(m.headers() or [])["tide.error"].decode() for m in read(settings, "dead-letter")]

    wait_until(lambda: len(errors()) >= 5, 60, interval=1.0)
    texts = errors()
    assert len(texts) == 5, texts
    for reason in ("duplicate_label", "wrong_type", "unknown_version", "unknown_event"):
        assert sum(reason in t for t in texts) == 1, (reason, texts)
    assert not judge.check_alive()
    assert len(finals(settings)) == 1


def test_an_equal_shadow_passes_and_is_promoted(settings: CommonSettings, judge: Services) -> None:
    policy = Canary(min_labels=300, min_duration_s=0, margin=0.02, promote=True, rollback=True)
    stream = Stream(settings, definitions(policy))
    stream.version(1)
    stream.version(2)
    stream.deploy("shadow", 2)
    judge.start("judge", "judge")
    for event, p, q, y in events(22, 0, 4000, noise=0.2):
        stream.prediction(event, "champion", 1, p)
        stream.prediction(event, "shadow", 2, q)
        stream.label(event, y)
    stream.flush()
    done = wait_for_finals(settings, judge, 1)
    assert len(done) == 1
    v = done[0]
    assert (v["outcome"], v["rule"], v["arm"], v["action"]) == (
        "pass",
        "non_inferiority",
        "shadow",
        "promote",
    )
    assert v["n"] == v["n_champion"] >= 300 and v["upper"] < 0.02
    ours = [d for d in decoded(settings, "deployments") if d.get("source") == "judge"]
    assert [(d["action"], d["version"]) for d in ours] == [("promote", 2)]
    time.sleep(2)  # its own promote, read back, ends nothing twice
    assert len(finals(settings)) == 1


def _uninterrupted(project: Project, sent: list[tuple[str, dict[str, Any]]]) -> MemoryEmitter:
    """The same records through the judge's step in one process, in production order."""
    out = MemoryEmitter()
    step = JudgeStep(JudgeSettings(), project, out)
    for i, (record, value) in enumerate(sent):
        step.handle(Incoming(record, value, b"u", "t", 0, i, 1_000 + i))
        if i % 200 == 199:
            step.flush()
    step.flush()
    return out


def test_killed_and_restarted_the_judge_repeats_and_loses_nothing(
    settings: CommonSettings, judge: Services
) -> None:
    policy = Canary(min_labels=1000, min_duration_s=0, margin=0.02)
    project = definitions(policy)
    stream = Stream(settings, project)
    stream.version(1)
    stream.version(2)
    stream.deploy("canary", 2, 0.3)

    def produce(start: int, stop: int) -> None:
        for event, p, q, y in events(23, start, stop, noise=1.5, flip_from=5000):
            if canary_share(event):
                stream.prediction(event, "canary", 2, q)
            else:
                stream.prediction(event, "champion", 1, p)
            stream.label(event, y)
        stream.flush()

    produce(0, 2000)
    judge.start("judge", "judge")
    assert wait_until(lambda: decoded(settings, "canary-verdicts"), 60, interval=0.5), judge.log_tail("judge")
    # Uninterrupted, this stream's final verdict comes at about event 3,400 (1,020 canary labels): the judge
    # is killed before it can have seen it, so the restarted one must reach it.
    produce(2000, 3000)
    time.sleep(0.5)
    judge.stop("judge", sig=signal.SIGKILL)  # mid-stream, mid-transaction
    killed_at = len(unique(decoded(settings, "canary-verdicts"), "verdict_id"))
    assert not [v for v in decoded(settings, "canary-verdicts") if v["final"]]
    judge.start("judge", "judge")
    produce(3000, 9000)
    wait_for_finals(settings, judge, 1)
    assert wait_until(lambda: decoded(settings, "drift-alerts"), 60, interval=1.0), judge.log_tail("judge")
    time.sleep(3)  # anything repeated would come now

    # The embedded broker shows records of aborted transactions to read_committed readers (the killed
    # judge's open transaction): what it held is published again with the same ids, the later copy
    # replacing the earlier (on Kafka the aborted copies are never seen). A judge restarted from scratch
    # instead of its checkpoint would publish its first verdicts again, after the later ones.
    verdicts = unique(decoded(settings, "canary-verdicts"), "verdict_id")
    assert len(verdicts) > killed_at  # the restarted judge went on
    done = [v for v in verdicts if v["final"]]
    assert len(done) == 1, done
    interim = [v["verdict_id"] for v in verdicts if not v["final"]]
    assert len(set(interim)) == len(interim)
    progress = [(v["n"], v["n_champion"]) for v in verdicts]
    assert progress == sorted(progress), "a verdict went back in time: it was repeated from an earlier state"
    alerts = unique(decoded(settings, "drift-alerts"), "alert_id")
    assert len({a["trigger_event_id"] for a in alerts}) == len(alerts), "an alert was repeated"

    whole = _uninterrupted(project, stream.sent)
    expected = [v for v in whole.of("canary-verdicts") if v["final"]]
    assert [(v["outcome"], v["rule"]) for v in done] == [(v["outcome"], v["rule"]) for v in expected]
    assert done[0]["outcome"] == "fail"
    assert len(alerts) == len(whole.of("drift-alerts")) >= 1
    assert "restored: clock" in judge.log_tail("judge", 400)  # from its checkpoint, not from scratch
