"""``tide drift`` killed (SIGKILL) mid-stream and restarted raises exactly the alerts an uninterrupted run
raises on the same input: none repeated, none lost. Real processes, the real broker and Redis."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from infra.kafka import make_producer, reader_from_beginning
from infra.topics import ensure_topics, topic
from models.profile import build_profile
from schemas import codec
from schemas.checkpoints import KafkaCheckpoints
from schemas.definitions import Labels, Model, Project, Source
from schemas.policy import Drift, Policy
from streams import drift
from streams.drift import DriftSettings
from streams.drift_service import transactional_id
from tide.embedded import StackInfo
from tide.plan import apply
from tide.processes import Services, wait_until

pytestmark = pytest.mark.integration

MODEL = "gauge"
INPUTS = ("value", "mode", "flag")  # numeric, categorical, binary
CHUNK = 3000
SEGMENT = 1000  # predictions per segment of the stream; segments alternate calm and drifting
READINGS: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "tests.drift_restart",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "mode", "type": "string"},
        {"name": "flag", "type": "boolean"},
        {"name": "ts", "type": "long"},
    ],
}
OUTCOMES: dict[str, Any] = {
    "type": "record",
    "name": "Outcome",
    "namespace": "tests.drift_restart",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "faulty", "type": "boolean"},
        {"name": "ts", "type": "long"},
    ],
}


def project() -> Project:
    readings = Source("readings", READINGS, key="sensor_id", event_time="ts")
    outcomes = Source("outcomes", OUTCOMES, key="sensor_id", event_time="ts")
    gauge = Model(
        MODEL,
        "binary",
        readings,
        list(INPUTS),
        labels=Labels("faulty", outcomes, "reading_id", "faulty", "binary"),
        learner="river.tree:HoeffdingTreeClassifier",  # takes the string input as it is
        monitor=list(INPUTS),
        policy=Policy(drift=Drift(cooldown_checks=2)),  # re-armed soon: several episodes per run
    )
    return Project.of("restart", [gauge])


def _rows(rng: np.random.Generator, n: int, drifting: bool) -> list[dict[str, Any]]:
    values = rng.normal(60.0 if drifting else 50.0, 10, n)
    modes = rng.choice(["a", "b", "c"], n, p=[0.2, 0.3, 0.5] if drifting else [0.5, 0.3, 0.2])
    flags = rng.random(n) < (0.5 if drifting else 0.75)
    return [
        {"value": float(v), "mode": str(m), "flag": bool(f)}
        for v, m, f in zip(values, modes, flags, strict=True)
    ]


def _stream(seed: int) -> tuple[list[bytes], list[bytes]]:
    """Two model versions with references, and predictions of both through calm and drifting segments."""
    rng = np.random.default_rng(seed)
    versions = []
    for version in (1, 2):
        rows = _rows(rng, 2000, drifting=False)
        record = {
            "model": MODEL,
            "version": version,
            "flavor": "river",
            "task": "binary",
            "artifact": b"",
            "sha256": "0" * 64,
            "feature_names": list(INPUTS),
            "metric_name": "logloss",
            "trained_on": len(rows),
            "reference": build_profile(rows, list(rng.beta(2, 8, 2000)), INPUTS),
            "created_ts": 1_700_000_000_000,
        }
        versions.append(codec.encode("model_version", record))
    predictions = []
    segments = [False, True, False, True, True, False, True, False, True]  # 9 segments, 3 chunks
    for s, drifting in enumerate(segments):
        scores = rng.beta(5, 5, SEGMENT) if drifting and s % 2 else rng.beta(2, 8, SEGMENT)
        for j, row in enumerate(_rows(rng, SEGMENT, drifting)):
            i = s * SEGMENT + j
            record = {
                "request_id": f"r{i}",
                "event_id": f"e{i:05d}",
                "entities": {"sensor_id": "s-1"},
                "model": MODEL,
                "version": 1 if i < 4 * SEGMENT + 500 else 2,
                "arm": "champion",
                "features": row,
                "score": float(scores[j]),
                "latency_ms": 1.0,
                "ts": 1_700_000_000_000 + i,
            }
            predictions.append(codec.encode("prediction", record))
    return versions, predictions


class Namespace:
    """One topic prefix with the project applied and a ``tide drift`` process that can be killed."""

    def __init__(self, stack: StackInfo, tmp: Path) -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}."
        self.settings = stack.settings(
            DriftSettings, topic_prefix=prefix, state_dir=tmp, drift_group=prefix + "drift"
        )
        ensure_topics(self.settings)
        apply(self.settings, project())
        self.producer = make_producer(self.settings)
        self.services = Services(
            {
                "TIDE_KAFKA_BOOTSTRAP": self.settings.kafka_bootstrap,
                "TIDE_REDIS_URL": self.settings.redis_url,
                "TIDE_TOPIC_PREFIX": prefix,
                "TIDE_STATE_DIR": str(tmp),
                "TIDE_DRIFT_GROUP": prefix + "drift",
            },
            tmp / "logs",
        )
        self.redis = redis.Redis.from_url(self.settings.redis_url)

    def produce(self, name: str, values: list[bytes]) -> None:
        for value in values:
            # One partition: the scorer must see the stream in one order, run after run.
            self.producer.produce(topic(self.settings, name), key=MODEL.encode(), value=value, partition=0)
        assert self.producer.flush(30) == 0

    def start(self) -> None:
        self.services.start("drift", "drift")

    def kill(self) -> None:
        assert self.services.check_alive() == [], self.services.log_tail("drift")
        self.services.stop("drift", signal.SIGKILL)

    def points(self) -> int:
        return int(self.redis.xlen(drift.stats_key(MODEL, self.settings.topic_prefix)))

    def committed(self) -> int:
        """The predictions position of the scorer's newest committed checkpoint (0 before the first)."""
        restored = KafkaCheckpoints(self.settings, transactional_id(self.settings)).load(timeout_s=10)
        if restored is None:
            return 0
        return restored.positions.get((topic(self.settings, "predictions"), 0), 0)

    def wait_committed(self, n: int, timeout: float = 120) -> None:
        assert wait_until(lambda: self.committed() >= n, timeout, 0.5), (
            f"committed {self.committed()} of {n}\n" + self.services.log_tail("drift", 40)
        )

    def alerts(self) -> list[dict[str, Any]]:
        consumer = reader_from_beginning(self.settings, topic(self.settings, "drift-alerts"), 1)
        got: list[dict[str, Any]] = []
        quiet = time.monotonic() + 3
        try:
            while time.monotonic() < quiet:
                for msg in consumer.consume(100, 0.2):
                    if msg.error() is None:
                        got.append(codec.decode(msg.value() or b"", "drift_alert"))
                        quiet = time.monotonic() + 3
        finally:
            consumer.close()
        return got

    def close(self) -> None:
        self.services.stop_all()
        self.redis.close()


@pytest.fixture
def namespaces(stack: StackInfo, tmp_path: Path) -> Iterator[tuple[Namespace, Namespace]]:
    pair = Namespace(stack, tmp_path / "whole"), Namespace(stack, tmp_path / "killed")
    yield pair
    for ns in pair:
        ns.close()


def _key(alert: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        alert[k] for k in ("alert_id", "version", "feature", "statistic", "trigger_event_id", "value")
    )


def test_killed_and_restarted_scorer_raises_each_alert_once(namespaces: tuple[Namespace, Namespace]) -> None:
    versions, predictions = _stream(seed=31)
    total = len(predictions)
    whole, killed = namespaces

    # The uninterrupted run.
    whole.produce("models", versions)
    whole.produce("predictions", predictions)
    whole.start()
    whole.wait_committed(total)
    expected = whole.alerts()
    assert len(expected) >= 4, expected  # several episodes, of several inputs and both versions
    assert {a["version"] for a in expected} == {1, 2}
    assert {a["feature"] for a in expected} >= {"value", "mode", "flag"}

    # The same input, fed while the scorer is killed twice mid-stream.
    killed.produce("models", versions)
    killed.produce("predictions", predictions[:CHUNK])
    killed.start()
    killed.wait_committed(CHUNK // 2)
    before = killed.points()
    killed.produce("predictions", predictions[CHUNK : 2 * CHUNK])
    # Killed as soon as it has checked some of the new records: its last batch is likely uncommitted.
    assert wait_until(lambda: killed.points() >= before + 5, 60, 0.02), killed.services.log_tail("drift")
    killed.kill()
    at_first_kill = killed.committed()
    assert 0 < at_first_kill < total

    killed.start()
    killed.produce("predictions", predictions[2 * CHUNK :])
    before = killed.points()
    assert wait_until(lambda: killed.points() >= before + 5, 60, 0.02), killed.services.log_tail("drift")
    killed.kill()
    assert killed.committed() < total, "the second kill came after the end of the stream"

    killed.start()
    killed.wait_committed(total)
    # The embedded broker shows records of aborted transactions to read_committed readers (a killed
    # scorer's open transaction): what it held is produced again, with the same ids (derived from model,
    # version, input and check number), the later copy replacing the earlier; on Kafka the aborted copies
    # are never seen. A scorer that lost its state instead (windows, alarms, check numbers) would raise
    # alerts the uninterrupted run did not, or with other check numbers, or miss some: compared below.
    got = list({a["alert_id"]: a for a in killed.alerts()}.values())
    assert len(got) == len(expected), "an alert was repeated or lost"
    assert sorted(map(_key, got)) == sorted(map(_key, expected))
