"""The online trainer against the real broker and Redis: the late-label join, publishing, resuming."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
import redis

from tide.processes import wait_until
from online_training import trainer
from examples.fraud.model import FEATURE_NAMES
from online_training.trainer import TrainerSettings, TrainerStep, latest_version, rolling_auc
from schemas import codec
from infra.kafka import make_producer
from infra.processor import Incoming
from streams.tail import tail
from infra.topics import topic

pytestmark = pytest.mark.integration


class Collect:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    def produce(self, topic_name: str, key: bytes | None = None, value: bytes = b"", **_: Any) -> None:
        self.records.append((topic_name, value))


def features(rng: random.Random, fraud: bool) -> dict[str, Any]:
    return {
        "amount": rng.uniform(200, 900) if fraud else rng.uniform(5, 80),
        "category": "gift_cards" if fraud else "grocery",
        "country": "US",
        "card_present": not fraud,
        "txn_count_1h": 3.0,
        "amount_sum_1h": 90.0,
        "amount_mean_1h": 30.0,
    }


def prediction(event_id: str, x: dict[str, Any], arm: str = "champion") -> dict[str, Any]:
    return {
        "request_id": event_id,
        "event_id": event_id,
        "entity": "card-1",
        "model": "fraud",
        "version": 1,
        "arm": arm,
        "features": x,
        "score": 0.5,
        "latency_ms": 1.0,
        "ts": 0,
    }


def item(record: str, value: dict[str, Any], offset: int = 0) -> Incoming:
    return Incoming(record, value, None, "t", 0, offset, 0)


def test_labels_join_served_features_in_either_order(settings: Any) -> None:
    s = TrainerSettings(**settings.model_dump(), trainer_publish_every=10_000)
    r = redis.Redis.from_url(s.redis_url)
    step = TrainerStep(s, Collect(), r)  # type: ignore[arg-type]
    rng = random.Random(1)
    # label first (parked), prediction later; prediction first, label in a later batch; a shadow never joins
    step.handle(item("label", {"event_id": "a", "card_id": "c", "is_fraud": True, "event_ts": 0, "ts": 0}))
    step.flush()
    assert step.trained_on == 0
    step.handle(item("prediction", prediction("a", features(rng, True))))
    step.handle(item("prediction", prediction("b", features(rng, False))))
    step.handle(item("prediction", prediction("s", features(rng, False), arm="shadow")))
    step.flush()
    assert step.trained_on == 1
    step.handle(item("label", {"event_id": "b", "card_id": "c", "is_fraud": False, "event_ts": 0, "ts": 0}))
    step.handle(item("label", {"event_id": "s", "card_id": "c", "is_fraud": False, "event_ts": 0, "ts": 0}))
    step.flush()
    assert step.trained_on == 2
    r.close()


def test_learns_publishes_and_resumes_exactly(settings: Any) -> None:
    s = TrainerSettings(
        **settings.model_dump(),
        trainer_publish_every=200,
        trainer_publish_interval_s=1.0,
        trainer_group=f"{settings.topic_prefix}tr",
    )
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(s, stop), daemon=True)
    thread.start()
    assert wait_until(lambda: latest_version(s) is not None, 20)  # the bootstrap version
    rng = random.Random(4)
    producer = make_producer(s)
    n = 1000
    for i in range(n):
        fraud = rng.random() < 0.2
        producer.produce(
            topic(s, "predictions"),
            key=b"c",
            value=codec.encode("prediction", prediction(f"e{i}", features(rng, fraud))),
        )
        producer.produce(
            topic(s, "labels"),
            key=b"c",
            value=codec.encode(
                "label", {"event_id": f"e{i}", "card_id": "c", "is_fraud": fraud, "event_ts": 0, "ts": 0}
            ),
        )
    producer.produce(topic(s, "labels"), key=b"c", value=b"\xc3\x01garbage")
    producer.flush(10)
    assert wait_until(lambda: (latest_version(s) or {}).get("trained_on") == n, 60)
    stop.set()
    thread.join(20)
    versions = [r["value"] for r in tail(s, "models")]
    assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
    assert len(versions) >= 3  # the bootstrap, then at least one per batch of >= 200 labels
    assert [v["trained_on"] for v in versions] == sorted(v["trained_on"] for v in versions)
    last = versions[-1]
    assert last["feature_names"] == list(FEATURE_NAMES)
    assert last["metric_value"] is not None and last["metric_value"] > 0.9  # the classes are separable
    assert last["reference"]["size"] == 1000 and last["reference"]["prediction"] is not None
    letters = list(tail(s, "dead-letter"))
    assert len(letters) == 1 and letters[0]["headers"]["tide.stage"] == "trainer"
    # a restarted trainer resumes from the last version and learns nothing twice
    step = trainer.restore_or_bootstrap(s, Collect(), redis.Redis.from_url(s.redis_url))  # type: ignore[arg-type]
    assert (step.version, step.trained_on) == (last["version"], n)


def test_rolling_auc_matches_pairwise_definition() -> None:
    rng = random.Random(2)
    ys = [rng.random() < 0.3 for _ in range(200)]
    ps = [round(rng.random(), 1) for _ in range(200)]  # many ties
    pos = [p for p, y in zip(ps, ys, strict=True) if y]
    neg = [p for p, y in zip(ps, ys, strict=True) if not y]
    pairs = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    assert rolling_auc(ys, ps) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert rolling_auc([True, True], [0.1, 0.2]) is None
