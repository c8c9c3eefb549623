"""The online trainer against the real broker and Redis, on the fraud example: the late-label join with
served inputs, learning events never scored from replayed features, publishing, resuming, and nothing
learnt twice across paths, redeliveries and crashes."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
import redis

from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator
from features import versions
from features.training import examples_for, read_source
from infra.kafka import make_producer
from infra.processor import Incoming
from infra.settings import CommonSettings
from infra.topics import topic
from online_training import trainer
from online_training.evaluation import rolling_auc
from online_training.publish import latest_record
from online_training.settings import TrainerSettings
from online_training.trainer import TrainerStep
from schemas import codec
from schemas.definitions import Project
from streams.tail import tail
from tide import Client
from tide.processes import wait_until

pytestmark = pytest.mark.integration


class Collect:
    """A producer that keeps what it is given (a transaction that never commits)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    def produce(self, topic_name: str, key: bytes | None = None, value: bytes = b"", **_: Any) -> None:
        self.records.append((topic_name, value))


def inputs(rng: random.Random, fraud: bool) -> dict[str, Any]:
    """What serving logs for a transaction of the fraud model (request fields, then features)."""
    return {
        "amount": rng.uniform(200, 900) if fraud else rng.uniform(5, 80),
        "category": "gift_cards" if fraud else "grocery",
        "country": "US",
        "card_present": not fraud,
        "txn_count_1h": 3,
        "amount_sum_1h": 90.0,
        "amount_mean_1h": 30.0,
        "amount_max_1h": 40.0,
        "amount_std_1h": 5.0,
        "merchants_1h": 2.0,
        "txn_count_today": 4,
        "txn_count_lifetime": 10,
    }


def prediction(
    event_id: str, x: dict[str, Any], arm: str = "champion", model: str = "fraud"
) -> dict[str, Any]:
    return {
        "request_id": f"r-{event_id}",
        "event_id": event_id,
        "entities": {"card_id": "card-1"},
        "model": model,
        "version": 1,
        "arm": arm,
        "features": x,
        "score": 0.5,
        "latency_ms": 1.0,
        "ts": 0,
    }


def label(event_id: str, fraud: bool) -> dict[str, Any]:
    return {"event_id": event_id, "card_id": "card-1", "is_fraud": fraud, "event_ts": 0, "ts": 0}


def item(record: str, value: dict[str, Any]) -> Incoming:
    return Incoming(record, value, None, "t", 0, 0, 0)


def trainer_settings(settings: CommonSettings, **overrides: Any) -> TrainerSettings:
    return TrainerSettings(
        **{
            **settings.model_dump(),
            "trainer_group": f"{settings.topic_prefix}trainer",
            "trainer_publish_interval_s": 1.0,
            **overrides,
        }
    )


def mark_live(settings: CommonSettings, project: Project, *refs: str) -> None:
    """Write view versions' state "live" (default: every version ``project`` keeps), as the feature
    processor does once a version's backfill has caught up: a model trains on live versions only."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        versions.mark_live(client, settings.topic_prefix, refs or tuple(project.view_versions))
    finally:
        client.close()


VIEWS_V1 = {"card_activity": 1, "card_daily": 1, "card_profile": 1}  # what the fraud model reads


def step_of(s: TrainerSettings, project: Project, client: redis.Redis) -> TrainerStep:
    return trainer.restore(s, project, Collect(), client)  # type: ignore[arg-type]


def keys_learnt(s: TrainerSettings) -> list[str]:
    return [e["key"] for e in trainer.learn_log(s, "fraud")]


def test_labels_join_served_inputs_in_either_order_once(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600, trainer_publish_interval_s=3600)
    client = redis.Redis.from_url(s.redis_url)
    mark_live(s, fraud_project)
    step = step_of(s, fraud_project, client)
    assert list(step.states) == ["fraud"]  # fraud_nn has no learner: it is `tide retrain`'s
    assert latest_record(s, "fraud")["version"] == 1  # type: ignore[index]  # untrained: serving can start
    rng = random.Random(1)
    # label first (parked), prediction later; prediction first, label in a later batch; a shadow never joins
    step.handle(item("chargebacks", label("a", True)))
    step.flush()
    assert keys_learnt(s) == []
    step.handle(item("prediction", prediction("a", inputs(rng, True))))
    step.handle(item("prediction", prediction("b", inputs(rng, False))))
    step.handle(item("prediction", prediction("s", inputs(rng, False), arm="shadow")))
    step.handle(item("prediction", prediction("o", inputs(rng, False), model="fraud_nn")))
    step.flush()
    assert keys_learnt(s) == ["a"]
    for key in ("b", "s", "o", "a"):  # "a" again: a redelivered label is not learnt twice
        step.handle(item("chargebacks", label(key, False)))
    step.handle(item("prediction", prediction("b", inputs(rng, False))))  # a rescore of b: once
    step.flush()
    assert keys_learnt(s) == ["a", "b"]
    entries = trainer.learn_log(s, "fraud")
    assert [(e["path"], e["y"], e["version"]) for e in entries] == [("served", True, 2), ("served", False, 2)]
    assert set(entries[0]["y_pred"]) == {"true", "false"}  # the probabilities the metric was fed
    assert step.states["fraud"].online.trained_on == 2
    client.close()


def test_learns_publishes_and_resumes_exactly(fraud: CommonSettings, fraud_project: Project) -> None:
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600)
    mark_live(s, fraud_project)
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(s, fraud_project, stop), daemon=True)
    thread.start()
    assert wait_until(lambda: latest_record(s, "fraud") is not None, 20)  # the bootstrap version
    rng = random.Random(4)
    producer = make_producer(s)
    n = 1000
    labels = []
    for i in range(n):
        fraud_ = rng.random() < 0.2
        value = codec.encode("prediction", prediction(f"e{i}", inputs(rng, fraud_)))
        producer.produce(topic(s, "predictions"), key=b"card-1", value=value)
        labels.append(label(f"e{i}", fraud_))
    producer.produce(f"{s.topic_prefix}labels", key=b"card-1", value=b"\xc3\x01garbage")
    assert producer.flush(10) == 0
    Client(s, fraud_project, 1).produce("chargebacks", labels)
    assert wait_until(lambda: (latest_record(s, "fraud") or {}).get("trained_on") == n, 60)
    stop.set()
    thread.join(20)
    assert not thread.is_alive()
    versions = [r["value"] for r in tail(s, "models")]
    assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
    assert len(versions) >= 3  # the bootstrap, then at least one per 500 labels (publish_every)
    assert [v["trained_on"] for v in versions] == sorted(v["trained_on"] for v in versions)
    last = versions[-1]
    model = fraud_project.models["fraud"]
    assert last["feature_names"] == list(model.input_names) and last["task"] == "binary"
    assert last["metric_name"] == "ROCAUC" and last["metric_value"] > 0.9  # the classes are separable
    assert last["definitions_digest"] == fraud_project.digest() and last["view_versions"] == VIEWS_V1
    reference = last["reference"]
    assert reference["size"] == n and reference["prediction"] is not None
    # model.monitor: the number histogrammed, the boolean counted by value
    assert [h["name"] for h in reference["features"]] == ["amount"]
    assert [c["name"] for c in reference["categories"]] == ["card_present"]
    letters = list(tail(s, "dead-letter"))
    assert len(letters) == 1 and letters[0]["headers"]["tide.stage"] == "trainer"
    assert sorted(keys_learnt(s)) == sorted(f"e{i}" for i in range(n))
    # a restarted trainer resumes from the last version (its metric too) and learns nothing twice
    client = redis.Redis.from_url(s.redis_url)
    step = step_of(s, fraud_project, client)
    online = step.states["fraud"].online
    assert (online.version, online.trained_on) == (last["version"], n)
    assert online.metric_value() == last["metric_value"]
    for lab in labels[:50]:
        step.handle(item("chargebacks", lab))
    step.flush()
    assert online.trained_on == n and len(keys_learnt(s)) == n
    client.close()


def test_a_crash_relearns_once_only_what_no_committed_version_holds(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600)
    client = redis.Redis.from_url(s.redis_url)
    rng = random.Random(7)
    served = {f"c{i}": inputs(rng, i % 3 == 0) for i in range(30)}
    mark_live(s, fraud_project)
    first = step_of(s, fraud_project, client)
    state = first.states["fraud"]
    for key, x in list(served.items())[:10]:
        first.handle(item("prediction", prediction(key, x)))
        first.handle(item("chargebacks", label(key, bool(x["category"] == "gift_cards"))))
    first.flush()
    first.publish(state, wait=True)  # version 2, committed, holds c0..c9
    for key, x in list(served.items())[10:20]:
        first.handle(item("prediction", prediction(key, x)))
        first.handle(item("chargebacks", label(key, bool(x["category"] == "gift_cards"))))
    first.flush()
    assert state.online.trained_on == 20
    # crash: c10..c19 were learnt, no version holds them; the consumer replays from version 2's offsets
    second = step_of(s, fraud_project, client)
    online = second.states["fraud"].online
    assert (online.version, online.trained_on) == (2, 10)
    for key, x in served.items():  # all of them arrive again (as after a reset), and c20..c29 are new
        second.handle(item("prediction", prediction(key, x)))
        second.handle(item("chargebacks", label(key, bool(x["category"] == "gift_cards"))))
    second.flush()
    assert online.trained_on == 30
    entries = trainer.learn_log(s, "fraud")
    relearnt = [e["key"] for e in entries if e["epoch"] == second.states["fraud"].store.epoch]
    assert relearnt == [f"c{i}" for i in range(10, 30)]  # c0..c9 were in version 2: not again
    client.close()


def test_events_never_scored_are_learnt_from_point_in_time_features(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    s = trainer_settings(fraud, trainer_prediction_grace_s=0.5, trainer_catchup_interval_s=0.1)
    gen = TransactionGenerator(GeneratorConfig(cards=30, seed=5, fraud_rate=0.2, label_delay=0))
    events, labels = [], []
    for _ in range(300):
        event, due = gen.next()
        events.append(event)
        labels += due
    client = Client(s, fraud_project, 1)
    client.produce("transactions", events)
    redis_client = redis.Redis.from_url(s.redis_url)
    mark_live(s, fraud_project)
    step = step_of(s, fraud_project, redis_client)
    assert keys_learnt(s) == []  # no label yet: nothing in history
    model = fraud_project.models["fraud"]
    replayed = {
        e.key: e
        for e in examples_for(
            fraud_project, model, read_source(s, model.request), labels
        )  # what serving read
    }
    scored = {lab["event_id"] for lab in labels[::2]}  # every other event was scored
    for lab in labels:
        if lab["event_id"] in scored:
            x = {**replayed[lab["event_id"]].x, "amount": 1.0}  # served inputs: marked to tell them apart
            step.handle(item("prediction", prediction(lab["event_id"], x)))
        step.handle(item("chargebacks", lab))
    step.flush()
    state = step.states["fraud"]
    assert state.online.trained_on == len(scored)  # the others wait for their grace

    def caught_up() -> bool:
        step.idle()  # what the processor calls when a poll brings nothing
        return state.online.trained_on == len(labels)

    assert wait_until(caught_up, 10, 0.1)
    entries = trainer.learn_log(s, "fraud")
    assert sorted(e["key"] for e in entries) == sorted(lab["event_id"] for lab in labels)
    assert {e["key"] for e in entries if e["path"] == "served"} == scored
    later = [e["key"] for e in entries if e["path"] == "replayed"]
    assert later == sorted(later, key=lambda k: (replayed[k].ts, k))  # a catch-up learns in event-time order
    # a prediction arriving after its label was replayed teaches nothing more
    step.handle(item("prediction", prediction(later[0], replayed[later[0]].x)))
    step.flush()
    assert state.online.trained_on == len(labels)
    redis_client.close()


def test_rolling_auc_matches_pairwise_definition() -> None:
    rng = random.Random(2)
    ys = [rng.random() < 0.3 for _ in range(200)]
    ps = [round(rng.random(), 1) for _ in range(200)]  # many ties
    pos = [p for p, y in zip(ps, ys, strict=True) if y]
    neg = [p for p, y in zip(ps, ys, strict=True) if not y]
    pairs = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    assert rolling_auc(ys, ps) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert rolling_auc([True, True], [0.1, 0.2]) is None
