"""Retraining triggered by drift alerts, and the blessing and lineage of every version, against the real
broker and Redis: the online trainer refreshes a model on an alert its policy lists (once per alert,
across a restart), ignores the others, publishes a candidate worse than the champion unblessed with the
reason; the batch retrainer retrains on an alert; every version records parent, trigger, data and
blessing."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
import uuid
from typing import Any

import pytest
import redis

from infra.kafka import make_producer
from infra.settings import CommonSettings
from infra.topics import topic
from online_training import batch, trainer
from online_training.refresh import Pending
from online_training.settings import RetrainSettings, TrainerSettings
from schemas import codec
from schemas.checkpoints import KafkaCheckpoints
from schemas.definitions import Project
from schemas.policy import Policy, Retrain
from streams.tail import tail
from tests.integration.test_batch_retrain import produce_generated
from tests.integration.test_trainer import (
    Collect,
    inputs,
    item,
    label,
    mark_live,
    prediction,
    trainer_settings,
)
from tide.processes import wait_until

pytestmark = pytest.mark.integration

LINEAGE_FIELDS = ("parent_version", "trigger", "data", "blessing")


def with_policy(project: Project, model: str, publish_every: int = 500, **retrain: Any) -> Project:
    """``project`` with ``model``'s retrain policy (and publishing cadence) set here, whatever the
    example declares."""
    changed = dataclasses.replace(
        project.models[model], policy=Policy(retrain=Retrain(**retrain)), publish_every=publish_every
    )
    return dataclasses.replace(project, models={**project.models, model: changed})


def alert(model: str, kind: str, alert_id: str | None = None, version: int = 1) -> dict[str, Any]:
    return {
        "alert_id": alert_id or uuid.uuid4().hex,
        "model": model,
        "version": version,
        "feature": "loss" if kind == "concept" else "amount",
        "statistic": "adwin" if kind == "concept" else "psi",
        "value": 0.4,
        "threshold": 0.1,
        "window_size": 100,
        "reference_size": 1000,
        "kind": kind,
        "ts": int(time.time() * 1000),
    }


def send_alerts(settings: CommonSettings, *alerts: dict[str, Any]) -> None:
    producer = make_producer(settings)
    for a in alerts:
        producer.produce(
            topic(settings, "drift-alerts"), key=a["model"].encode(), value=codec.encode("drift_alert", a)
        )
    assert producer.flush(10) == 0


def versions(settings: CommonSettings, model: str) -> list[dict[str, Any]]:
    return [r["value"] for r in tail(settings, "models") if r["value"]["model"] == model]


def triggered(settings: CommonSettings, model: str) -> list[dict[str, Any]]:
    return [v for v in versions(settings, model) if "alert" in (v["trigger"] or "")]


T0 = 1_700_000_000_000  # the event time of event 0; event i's label is stamped T0 + i


def produce_stream(settings: CommonSettings, project: Project, start: int, n: int, *, flipped: bool) -> None:
    """``n`` scored events and their labels; after the concept change (``flipped``) the same inputs mean
    the opposite."""
    rng = random.Random(start)
    producer = make_producer(settings)
    labels = []
    for i in range(start, start + n):
        looks = rng.random() < 0.3
        value = codec.encode("prediction", prediction(f"e{i}", inputs(rng, looks)))
        producer.produce(topic(settings, "predictions"), key=b"card-1", value=value)
        labels.append({**label(f"e{i}", looks != flipped), "ts": T0 + i})
    assert producer.flush(10) == 0
    from tide import Client

    Client(settings, project, 1).produce("chargebacks", labels)


def test_a_concept_alert_refreshes_an_online_model_once(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    project = with_policy(fraud_project, "fraud", on=("concept",), window=300, min_interval_s=0)
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600)
    mark_live(s, project)

    def start() -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        thread = threading.Thread(
            target=trainer.run, args=(s, project, stop), kwargs={"follow": False}, daemon=True
        )
        thread.start()
        return thread, stop

    thread, stop = start()
    assert wait_until(lambda: len(versions(s, "fraud")) >= 1, 30)  # the bootstrap version
    produce_stream(s, project, 0, 600, flipped=False)
    produce_stream(s, project, 600, 300, flipped=True)  # the concept changes; the window: after it
    assert wait_until(lambda: (versions(s, "fraud") or [{}])[-1].get("trained_on") == 900, 60)
    before = versions(s, "fraud")
    champion = max(v["version"] for v in before if v["blessing"] is None or v["blessing"]["blessed"])
    concept = alert("fraud", "concept")
    send_alerts(
        s,
        alert("fraud", "input"),  # not in the policy: ignored
        concept,
        alert("fraud_nn", "concept"),  # a batch model: not the online trainer's
        concept,  # the same alert again: acted on once
    )
    assert wait_until(lambda: len(triggered(s, "fraud")) == 1, 60)
    [refresh] = triggered(s, "fraud")
    assert refresh["trigger"] == f"concept drift alert {concept['alert_id']}"
    assert refresh["parent_version"] == champion and refresh["flavor"] == "river"
    blessing = refresh["blessing"]
    assert blessing["baseline_version"] == champion and blessing["window_labels"] > 0 and blessing["reason"]
    # warmed on recent labels only, it beats the learner that knew the old concept, on the same window
    assert blessing["blessed"] and blessing["candidate_value"] > blessing["baseline_value"], blessing
    assert refresh["trained_on"] == 300 and refresh["data"]["first_ts"] is not None

    # a restart re-reads nothing it acted on; a second alert refreshes once more
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    thread, stop = start()
    second = alert("fraud", "concept")
    send_alerts(s, second)
    try:
        assert wait_until(lambda: len(triggered(s, "fraud")) == 2, 60)
        again = triggered(s, "fraud")[1]
        assert again["trigger"].endswith(second["alert_id"]) and again["parent_version"] == refresh["version"]
        # After the restart the window is rebuilt from the learn log, and the champion (the first refresh,
        # trained on those very labels) is scored on them by its artifact: it may well win, and then the
        # second refresh is left beside the lineage. Either way the lineage goes on from the learner of
        # the newest blessed refresh: more labels, a scheduled version whose parent is that one.
        assert again["blessing"]["baseline_version"] == refresh["version"] and again["blessing"]["reason"]
        newest = again["version"] if again["blessing"]["blessed"] else refresh["version"]
        produce_stream(s, project, 900, 500, flipped=True)
        assert wait_until(lambda: versions(s, "fraud")[-1]["version"] > again["version"], 60)
    finally:
        stop.set()
        thread.join(30)
    after = versions(s, "fraud")
    assert [v["version"] for v in after] == list(range(1, len(after) + 1))
    assert len(triggered(s, "fraud")) == 2 and not triggered(s, "fraud_nn")
    last = after[-1]
    assert last["trigger"] == "schedule" and last["parent_version"] == newest
    for v in after:  # every version carries its lineage
        assert all(f in v for f in LINEAGE_FIELDS)
        assert v["trigger"] and v["data"] is not None and v["blessing"] is not None, v["version"]
        assert v["version"] == 1 or v["parent_version"] is not None
    served = [v for v in after if v["data"]["offsets"]]
    assert served and all(f"{topic(s, 'predictions')}:0" in v["data"]["offsets"] for v in served)
    # the trainer's positions are kept with its output: all 5 alerts were read, whatever the broker does
    # with transactions that hold only offsets
    restored = KafkaCheckpoints(s, trainer.transactional_id(s)).load()
    assert restored is not None and restored.positions[topic(s, "drift-alerts"), 0] == 5


def test_a_concept_refresh_waits_for_labels_since_the_change_point_across_a_restart(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    """A concept alert that estimates its change point: the refresh waits for labels since it (the wait
    checkpointed with the alert's offset, so a restart in between neither loses nor repeats it), then a
    fresh learner is warmed and blessed on those labels only."""
    project = with_policy(fraud_project, "fraud", on=("concept",), window=400, min_interval_s=0)
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600, trainer_refresh_min_labels=250)
    mark_live(s, project)
    checkpoints = KafkaCheckpoints(s, trainer.transactional_id(s))

    def start(settings: TrainerSettings) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        thread = threading.Thread(
            target=trainer.run, args=(settings, project, stop), kwargs={"follow": False}, daemon=True
        )
        thread.start()
        return thread, stop

    def waiting() -> list[str]:
        """The alerts of the refreshes waiting in the trainer's newest checkpoint, if it read the alert."""
        restored = checkpoints.load(timeout_s=5)
        if restored is None or restored.positions.get((topic(s, "drift-alerts"), 0)) != 1:
            return []
        return [p.alert["alert_id"] for p in Pending.loads(restored.state or b"{}").values()]

    thread, stop = start(s)
    try:
        assert wait_until(lambda: len(versions(s, "fraud")) >= 1, 30)
        produce_stream(s, project, 0, 600, flipped=False)
        produce_stream(s, project, 600, 20, flipped=True)  # the concept changes at label 600
        assert wait_until(lambda: versions(s, "fraud")[-1].get("trained_on") == 620, 60)
        # the judge's estimate: the change point 20 labels before the label of event e619
        concept = {**alert("fraud", "concept"), "delay_records": 20, "trigger_event_id": "e619"}
        send_alerts(s, concept)
        assert wait_until(lambda: waiting() == [concept["alert_id"]], 30)
        champion = versions(s, "fraud")[-1]
        assert triggered(s, "fraud") == []  # 20 labels since the change point: fewer than 250
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()

    # The alert is not read again: the wait comes back from the checkpoint. No scheduled version comes
    # in between (the champion stays the one of the alert's time): after a restart the champion is scored
    # by its artifact on what the window holds from before it, labels it learnt (refresh module).
    thread, stop = start(s.model_copy(update={"trainer_publish_interval_s": 3600.0}))
    try:
        produce_stream(s, project, 620, 280, flipped=True)
        assert wait_until(lambda: len(triggered(s, "fraud")) == 1, 60)
        assert wait_until(lambda: waiting() == [], 30)
    finally:
        stop.set()
        thread.join(30)
    [refresh] = triggered(s, "fraud")
    blessing = refresh["blessing"]
    assert refresh["trigger"] == f"concept drift alert {concept['alert_id']}"
    # warmed and blessed on the 300 labels since the change point, none from before it, against the
    # champion of the alert's time (it knew the old concept)
    assert refresh["trained_on"] == blessing["window_labels"] == 300
    assert refresh["data"]["first_ts"] >= T0 + 600 and refresh["data"]["last_ts"] == T0 + 899
    assert blessing["baseline_version"] == champion["version"] and champion["trained_on"] == 620
    assert blessing["blessed"] and blessing["candidate_value"] > blessing["baseline_value"], blessing


def test_the_learn_log_keeps_its_newest_entries_whatever_the_batches(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    """The learn log (a restarted trainer's refresh window comes from it) keeps the newest
    ``trainer_learn_log`` entries, however small the batches before a large one were."""
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600, trainer_learn_log=100)
    mark_live(s, fraud_project)
    client = redis.Redis.from_url(s.redis_url)
    step = trainer.restore(s, fraud_project, Collect(), client)  # type: ignore[arg-type]
    rng = random.Random(9)
    for n, size in enumerate([1] * 150 + [500, 30]):
        for j in range(size):
            key = f"b{n}-{j}"
            step.handle(item("prediction", prediction(key, inputs(rng, j % 3 == 0))))
            step.handle(item("chargebacks", label(key, j % 3 == 0)))
        step.flush()
    keys = [e["key"] for e in trainer.learn_log(s, "fraud")]
    assert keys == [f"b150-{j}" for j in range(430, 500)] + [f"b151-{j}" for j in range(30)]
    client.close()


def noisy_inputs(rng: random.Random) -> tuple[dict[str, Any], bool]:
    x = inputs(rng, False)
    x["amount"] = rng.uniform(5, 900)
    return x, rng.random() < 1 / (1 + math.exp(-(x["amount"] - 450) / 150))


def test_a_candidate_worse_than_the_champion_is_published_unblessed(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    project = with_policy(fraud_project, "fraud", on=("concept", "drift"), window=200, min_interval_s=0)
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600, trainer_publish_interval_s=3600)
    mark_live(s, project)
    client = redis.Redis.from_url(s.redis_url)
    collect = Collect()
    step = trainer.restore(s, project, collect, client)  # type: ignore[arg-type]
    rng = random.Random(3)
    for i in range(1000):  # no concept change: the lineage knows the stream well
        x, y = noisy_inputs(rng)
        step.handle(item("prediction", prediction(f"n{i}", x)))
        step.handle(item("chargebacks", label(f"n{i}", y)))
        if i % 500 == 499:
            step.flush()
    published = [codec.decode(v, "model_version") for t, v in collect.records if t == topic(s, "models")]
    assert [p["trigger"] for p in published] == ["schedule", "schedule"]  # publish_every 500
    for p in published:
        assert p["blessing"] is not None and p["parent_version"] == p["version"] - 1
    champion = step.champions.version("fraud")
    assert champion == published[-1]["version"]
    state = step.states["fraud"]
    old_learner = state.online.learner
    step.handle(item("drift_alert", alert("fraud", "input")))
    assert step.flush() is True  # a version to commit with the alert's offset
    refresh = codec.decode(collect.records[-1][1], "model_version")
    blessing = refresh["blessing"]
    # a fresh learner warmed on 200 labels predicts them worse than the lineage that knew the stream
    assert not blessing["blessed"] and "change threshold" in blessing["reason"], blessing
    assert (
        blessing["candidate_value"] < blessing["baseline_value"] and blessing["baseline_version"] == champion
    )
    assert refresh["parent_version"] == champion and refresh["trigger"].startswith("input drift alert")
    assert step.champions.version("fraud") == champion  # never the champion
    assert state.online.learner is old_learner  # the lineage goes on with its own learner
    client.close()


def test_an_alert_the_policy_does_not_list_triggers_nothing(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600, trainer_publish_interval_s=3600)
    project = with_policy(fraud_project, "fraud", on=("drift",), min_interval_s=0)
    mark_live(s, project)
    client = redis.Redis.from_url(s.redis_url)
    collect = Collect()
    step = trainer.restore(s, project, collect, client)  # type: ignore[arg-type]
    for i in range(50):
        step.handle(item("prediction", prediction(f"n{i}", inputs(random.Random(i), i % 2 == 0))))
        step.handle(item("chargebacks", label(f"n{i}", i % 2 == 0)))
    step.flush()  # something to refresh on
    step.handle(item("drift_alert", alert("fraud", "concept")))  # drift only: not a concept alert
    step.handle(item("drift_alert", alert("fraud_nn", "input")))  # a model this trainer does not train
    assert step.flush() is False and collect.records == []
    client.close()


def test_the_batch_retrainer_retrains_on_an_alert(fraud: CommonSettings, fraud_project: Project) -> None:
    project = with_policy(fraud_project, "fraud_nn", on=("drift",), window=300, min_interval_s=0)
    rs = RetrainSettings(
        **fraud.model_dump(),
        retrain_epochs=3,
        retrain_min_labels=500,
        retrain_group=f"{fraud.topic_prefix}retrain",
        retrain_triggered_labels=600,
    )
    mark_live(rs, project)
    produce_generated(rs, project, 1500, seed=21)
    results: list[dict[str, Any]] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=batch.run,
        args=(rs, project),
        kwargs={"every_s": 3600, "stop": stop, "on_result": results.append, "follow": False},
        daemon=True,
    )
    thread.start()
    try:
        assert wait_until(lambda: len(results) == 1, 120)
        first = results[0]
        assert first["published"] and first["trigger"] == "schedule" and first["blessed"], first
        drift = alert("fraud_nn", "input")
        send_alerts(rs, alert("fraud_nn", "concept"), drift, drift, alert("fraud", "input"))
        assert wait_until(lambda: len(results) == 2, 120)
        last = alert("fraud_nn", "output")  # a later alert: everything before it was read
        send_alerts(rs, last)
        assert wait_until(lambda: len(results) == 3, 120)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert [r["trigger"] for r in results] == [
        "schedule",
        f"input drift alert {drift['alert_id']}",
        f"output drift alert {last['alert_id']}",
    ]
    records = versions(rs, "fraud_nn")
    assert [r["version"] for r in records] == [1, 2, 3]
    one, two, _ = records
    assert (
        one["parent_version"] is None
        and one["blessing"]["blessed"]
        and one["blessing"]["baseline_version"] is None
    )
    assert two["parent_version"] == 1 and two["trigger"] == results[1]["trigger"]
    assert two["blessing"]["baseline_version"] == 1 and two["blessing"]["window_labels"] == 300
    assert two["blessing"]["reason"] and two["blessing"]["candidate_value"] is not None
    assert two["data"]["first_ts"] <= two["data"]["last_ts"]
    # scheduled: every training example; triggered: the newest 600 only (the same held-out window)
    assert (one["trained_on"], two["trained_on"]) == (1200, 600)
    assert (
        one["data"]["first_ts"] < two["data"]["first_ts"] and one["data"]["last_ts"] == two["data"]["last_ts"]
    )
