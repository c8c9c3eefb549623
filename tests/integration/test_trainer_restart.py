"""``tide train`` killed (SIGKILL) mid-stream, while labels and a concept-drift alert are in flight, and
restarted, ends where an uninterrupted run ends: every label learnt once by the lineage, no model version
published twice, every alert its policy lists answered by exactly one refresh, and the trainer's
checkpointed positions at the end of each input. Real processes, the real broker and Redis.

An uninterrupted run's versions depend on timing (a version per ``publish_every`` labels or per quiet
interval), so the expectation is what any uninterrupted run guarantees on this input, checked exactly:
the learn log's entries that count (those of a version committed by the run that learnt them, as
:mod:`online_training.joins` defines) hold each label once, with its target; versions are numbered
1, 2, ... with none repeated; each alert is named by one version's trigger."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from infra.kafka import make_producer
from infra.topics import ensure_topics, topic
from online_training import trainer
from online_training.lineage import LineageIndex
from online_training.settings import TrainerSettings
from schemas import codec
from schemas.checkpoints import KafkaCheckpoints
from schemas.definitions import Project
from schemas.registry import register_schemas
from tests.integration.test_cli import stack_env
from tests.integration.test_drift_restart import MODEL, project
from tests.integration.test_retrain_triggers import alert, triggered, versions, with_policy
from tide import Client
from tide.embedded import StackInfo
from tide.plan import apply
from tide.processes import Services, wait_until

pytestmark = pytest.mark.integration

CHUNK = 1500  # labelled events per part of the stream


def definitions() -> Project:
    """The drift restart test's model, refreshed on every concept alert (no minimum interval), warmed on
    the newest 10 labels; a version per 2000 labels or per quiet interval."""
    return with_policy(project(), MODEL, publish_every=2000, on=("concept",), window=10, min_interval_s=0)


def events(start: int, n: int, *, flipped: bool) -> tuple[list[bytes], list[dict[str, Any]]]:
    """Predictions (served by version 1, the trainer's first) of ``n`` events and their labels; after the
    concept change (``flipped``) the same inputs mean the opposite."""
    rng = np.random.default_rng(start)
    values = rng.normal(50, 10, n)
    modes = rng.choice(["a", "b", "c"], n)
    flags = rng.random(n) < 0.5
    predictions, labels = [], []
    for j in range(n):
        i, value = start + j, float(values[j])
        record = {
            "request_id": f"r{i}",
            "event_id": f"e{i}",
            "entities": {"sensor_id": "s-1"},
            "model": MODEL,
            "version": 1,
            "arm": "champion",
            "features": {"value": value, "mode": str(modes[j]), "flag": bool(flags[j])},
            "score": 0.5,
            "latency_ms": 1.0,
            "ts": 1_700_000_000_000 + i,
        }
        predictions.append(codec.encode("prediction", record))
        faulty = (value > 50) != flipped
        labels.append({"reading_id": f"e{i}", "sensor_id": "s-1", "faulty": faulty, "ts": record["ts"]})
    return predictions, labels


class Namespace:
    """One topic prefix with the model applied and a ``tide train`` process that can be killed."""

    def __init__(self, stack: StackInfo, tmp: Path) -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}."
        self.settings = stack.settings(
            TrainerSettings, topic_prefix=prefix, state_dir=tmp, trainer_group=prefix + "trainer"
        )
        ensure_topics(self.settings)
        self.project = definitions()
        apply(self.settings, self.project)
        register_schemas(self.project)  # this process encodes the labels source
        self.producer = make_producer(self.settings)
        self.client = Client(self.settings, self.project, 1)
        env = stack_env(self.settings, tmp) | {
            "TIDE_TRAINER_GROUP": self.settings.trainer_group,
            "TIDE_TRAINER_PREDICTION_GRACE_S": "3600",  # every label joins its served inputs
            "TIDE_TRAINER_PUBLISH_INTERVAL_S": "5",  # labels wait for a version
            # Every label learnt, by every run, is checked: keep the whole log.
            "TIDE_TRAINER_LEARN_LOG": "1000000",
        }
        self.services = Services(env, tmp / "logs")
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        self.labels: dict[str, bool] = {}
        self.sent: Counter[str] = Counter()  # records produced, by topic

    def feed(self, start: int, n: int, *, flipped: bool) -> None:
        predictions, labels = events(start, n, flipped=flipped)
        name = topic(self.settings, "predictions")
        for value in predictions:
            self.producer.produce(name, key=MODEL.encode(), value=value, partition=0)
        assert self.producer.flush(30) == 0
        self.client.produce("outcomes", labels)
        self.sent[name] += n
        self.sent[f"{self.settings.topic_prefix}outcomes"] += n
        self.labels.update((lab["reading_id"], lab["faulty"]) for lab in labels)

    def alert(self) -> str:
        sent, name = alert(MODEL, "concept"), topic(self.settings, "drift-alerts")
        self.producer.produce(name, key=MODEL.encode(), value=codec.encode("drift_alert", sent))
        assert self.producer.flush(10) == 0
        self.sent[name] += 1
        return str(sent["alert_id"])

    def start(self) -> None:
        self.services.start("train", "train")

    def kill(self) -> None:
        assert self.services.check_alive() == [], self.services.log_tail("train")
        self.services.stop("train", signal.SIGKILL)

    def log(self) -> list[dict[str, Any]]:
        return trainer.learn_log(self.settings, MODEL)

    def learning(self, more: int) -> None:
        """Wait until the trainer has learnt ``more`` labels beyond what it had learnt."""
        before = len(self.log())
        assert wait_until(lambda: len(self.log()) >= before + more, 60, 0.02), self.services.log_tail("train")

    def answered(self) -> Counter[str]:
        """How many committed versions name each alert as their trigger."""
        return Counter(v["trigger"] for v in triggered(self.settings, MODEL))

    def holds(self) -> int:
        """How many labels the newest version had read (the labels offsets its data records)."""
        newest = versions(self.settings, MODEL)[-1]
        return sum(
            o
            for k, o in newest["data"]["offsets"].items()
            if k.startswith(f"{self.settings.topic_prefix}outcomes:")
        )

    def positions(self) -> dict[str, int]:
        """Input topic -> the sum of next offsets over its partitions, in the trainer's newest checkpoint."""
        restored = KafkaCheckpoints(self.settings, trainer.transactional_id(self.settings)).load(timeout_s=10)
        found: Counter[str] = Counter()
        for (name, _), offset in (restored.positions if restored is not None else {}).items():
            found[name] += offset
        return {name: found[name] for name in self.sent}

    def committed(self) -> dict[int, int]:
        """Per run (epoch) of the model's one lineage that ended: the version the next run resumed from
        (its last committed version of the lineage)."""
        [lineage] = {
            v.decode().lstrip("~")
            for v in self.redis.hvals(LineageIndex(self.redis, self.settings.topic_prefix, MODEL).key)
        }
        raw = self.redis.hgetall(f"{self.settings.topic_prefix}tide:train:{MODEL}:{lineage}:epochs")
        return {int(k): int(v) for k, v in raw.items()}

    def close(self) -> None:
        self.services.stop_all()
        self.redis.close()


@pytest.fixture
def ns(stack: StackInfo, tmp_path: Path) -> Iterator[Namespace]:
    namespace = Namespace(stack, tmp_path)
    yield namespace
    namespace.close()


def test_killed_and_restarted_trainer_learns_and_reacts_once(ns: Namespace) -> None:
    ns.start()
    assert wait_until(lambda: versions(ns.settings, MODEL), 60), ns.services.log_tail("train")  # version 1
    ns.feed(0, CHUNK, flipped=False)
    alerts = [ns.alert()]
    assert wait_until(lambda: len(ns.answered()) == 1, 60), ns.services.log_tail("train")

    # Kill 1: the new concept's labels partly learnt (no version holds them yet), an alert just sent.
    ns.feed(CHUNK, CHUNK, flipped=True)
    ns.learning(50)
    alerts.append(ns.alert())
    ns.kill()
    at_kill = ns.positions()
    ns.start()
    assert wait_until(lambda: len(ns.answered()) == 2, 60), ns.services.log_tail("train")

    # Kill 2: right after a refresh committed. Warmed on 10 labels, it is most likely not blessed: the
    # labels the lineage learnt since its last version are then in no committed version of the lineage
    # unless it publishes one with the refresh (a restart resumes the lineage, not the refresh).
    ns.feed(2 * CHUNK, CHUNK, flipped=True)
    assert wait_until(lambda: len({e["key"] for e in ns.log()}) == len(ns.labels), 60)
    alerts.append(ns.alert())
    assert wait_until(lambda: len(ns.answered()) == 3, 60, 0.05), ns.services.log_tail("train")
    ns.kill()
    ns.start()
    alerts.append(ns.alert())  # to the restarted trainer, after the stream

    total = dict(ns.sent)
    assert wait_until(lambda: ns.positions() == total, 60, 0.5), (ns.positions(), total)
    assert wait_until(lambda: len(ns.answered()) >= len(alerts), 60), ns.services.log_tail("train")
    wait_until(lambda: ns.holds() == len(ns.labels), 20)  # the newest version has read every label
    assert ns.services.check_alive() == [], ns.services.log_tail("train")

    # Versions: none published twice, numbered without gaps.
    numbers = [v["version"] for v in versions(ns.settings, MODEL)]
    assert len(set(numbers)) == len(numbers), f"a version was published twice: {numbers}"
    assert sorted(numbers) == list(range(1, len(numbers) + 1))

    # Alerts: each answered by exactly one version.
    assert ns.answered() == Counter(f"concept drift alert {a}" for a in alerts)

    # Labels: learnt once each by the lineage. An entry counts when its run committed a version of the
    # lineage holding it (the last run: its newest version); a killed run's entries past its last
    # committed version are those the next run learnt again.
    ended = ns.committed()
    assert sorted(ended) == [1, 2]  # two runs were killed
    entries = ns.log()
    holds = {**ended, 3: max(numbers)}
    counted = [e for e in entries if e["version"] <= holds[e["epoch"]]]
    learnt = Counter(e["key"] for e in counted)
    assert {k for k, n in learnt.items() if n > 1} == set(), "a label was learnt twice"
    assert set(ns.labels) - set(learnt) == set(), "a label was lost"
    assert all(e["y"] == ns.labels[e["key"]] and e["path"] == "served" for e in counted)
    assert len(entries) > len(counted), "no kill caught labels learnt but not in a committed version"
    assert ns.holds() == len(ns.labels)

    # Positions: moved on from where the killed trainer had committed, to the end of every input.
    outcomes = f"{ns.settings.topic_prefix}outcomes"
    assert at_kill[outcomes] < total[outcomes] and at_kill[topic(ns.settings, "drift-alerts")] < 2
    assert ns.positions() == total
