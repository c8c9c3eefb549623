"""The scoring service against the real broker and Redis: follow the models topic, read online features,
log predictions, and switch versions live."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
import redis
from confluent_kafka import Producer

from features import tiles
from features.store import RedisOnlineStore, ViewBatch
from infra.imports import import_object
from infra.kafka import reader_from_beginning
from infra.settings import CommonSettings, env_var
from infra.topics import TOPICS, topic
from models.artifacts import dump_river
from schemas import codec
from schemas.definitions import Project
from serving.app import create_app
from serving.registry import ModelRegistry
from serving.settings import ServeSettings
from tide import cli
from tide.embedded import StackInfo

pytestmark = pytest.mark.integration

FEATURES = {"amount": 80.0, "category": "travel", "country": "FR", "card_present": False}
DAY_MS = 86_400_000


@pytest.fixture
def serve_settings(stack: StackInfo, fraud: CommonSettings) -> ServeSettings:
    """Serving settings in the namespace the fraud example was applied to."""
    return stack.settings(
        ServeSettings, topic_prefix=fraud.topic_prefix, state_dir=fraud.state_dir, project=fraud.project
    )


def model_record(project: Project, version: int, *, seed: int, sha256: str | None = None) -> dict[str, Any]:
    model = import_object(str(project.models["fraud"].learner))()
    for i in range(20 * seed):  # different training, different scores
        model.learn_one({**FEATURES, "amount": float(i % 7) * 30}, i % 3 == 0)
    blob, digest = dump_river(model)
    return {
        "model": "fraud",
        "version": version,
        "flavor": "river",
        "task": "binary",
        "artifact": blob,
        "artifact_uri": None,
        "sha256": sha256 or digest,
        "feature_names": list(project.models["fraud"].input_names),
        "metric_name": "rocauc",
        "metric_value": 0.5,
        "trained_on": 20 * seed,
        "reference": None,
        "created_ts": int(time.time() * 1000),
        "definitions_digest": project.digest(),
    }


def publish(settings: ServeSettings, *records: dict[str, Any]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for record in records:
        producer.produce(
            topic(settings, "models"),
            key=record["model"].encode(),
            value=codec.encode("model_version", record),
        )
    assert producer.flush(10) == 0


def find_prediction(settings: ServeSettings, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    consumer = reader_from_beginning(
        settings, topic(settings, "predictions"), TOPICS["predictions"].partitions
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.2):
                if msg.error() is None:
                    record = codec.decode(msg.value(), "prediction")
                    if record["request_id"] == request_id:
                        assert msg.key() == record["entities"]["card_id"].encode()
                        return record
        raise AssertionError(f"no prediction {request_id} on {topic(settings, 'predictions')}")
    finally:
        consumer.close()


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls Redis has served so far, by command (INFO, which this asks with, left out)."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


async def test_serve_follow_score_log_and_swap(serve_settings: ServeSettings, fraud_project: Project) -> None:
    entity = f"card-{uuid.uuid4().hex[:10]}"
    store = RedisOnlineStore.from_url(serve_settings.redis_url, serve_settings.topic_prefix)
    now = int(time.time() * 1000)
    events = [
        {
            "event_id": f"e{i}",
            "card_id": entity,
            "amount": a,
            "merchant_id": m,
            "category": "travel",
            "country": "FR",
            "card_present": False,
            "ts": now - 5_000 + i,
        }
        for i, (a, m) in enumerate(((10.0, "m1"), (30.0, "m2")))
    ]
    views = [v for v in fraud_project.views.values() if v.source.name == "transactions"]
    partition = f"{serve_settings.topic_prefix}events:0"
    batches = [ViewBatch(v, partition, tiles.record_deltas(v, enumerate(events)), 1, now) for v in views]
    assert await store.apply(batches) == []
    await store.close()

    v1, v2 = model_record(fraud_project, 1, seed=1), model_record(fraud_project, 2, seed=3)
    publish(serve_settings, v1)
    app = create_app(serve_settings)  # the definitions from the registry, as `tide serve` reads them
    registry: ModelRegistry = app.state.registry
    body = {"entity": entity, "event_id": "ev-77", "features": FEATURES}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as client,
    ):
        await asyncio.to_thread(registry.wait_for, "fraud", 1, 30.0)
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        # ready: fraud serves, and no other model of the example has a version published yet
        assert ready.json() == {
            "status": "ready",
            "models": {n: 1 if n == "fraud" else None for n in fraud_project.models},
        }

        resp = await client.post("/v1/models/fraud/score", json=body)
        assert resp.status_code == 200, resp.text
        # One request reads every view it needs in one script call, and nothing else.
        counter = redis.Redis.from_url(serve_settings.redis_url)
        try:
            before = command_calls(counter)
            resp = await client.post("/v1/models/fraud/score", json=body)
            after = command_calls(counter)
        finally:
            counter.close()
        assert resp.status_code == 200
        # (commands a script runs are counted too: one HGETALL per view version the model reads, each
        # its own hash of the card, all in the card's hash slot)
        assert {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)} == {
            "evalsha": 1,
            "hgetall": 3,
        }
        out = resp.json()
        today = sum(1 for e in events if e["ts"] // DAY_MS == now // DAY_MS)
        assert out["version"] == 1 and out["entities"] == {"card_id": entity}
        assert out["feature_status"] == {
            "card_activity": "present",
            "card_daily": "present",
            "card_profile": "present",
        }
        assert out["features"] == {
            **FEATURES,
            "txn_count_1h": 2,
            "amount_sum_1h": 40.0,
            "amount_mean_1h": 20.0,
            "amount_max_1h": 30.0,
            "amount_std_1h": 10.0,
            "merchants_1h": 2.0,
            "txn_count_today": today,
            "txn_count_lifetime": 2,
        }
        assert 0.0 <= out["score"] <= 1.0 and 4_000 <= out["feature_age_ms"]["card_activity"] < 60_000

        logged = await asyncio.to_thread(find_prediction, serve_settings, out["request_id"])
        assert logged["entities"] == {"card_id": entity} and logged["event_id"] == "ev-77"
        assert logged["features"] == out["features"] and logged["score"] == out["score"]
        assert isinstance(logged["features"]["txn_count_1h"], int)
        assert (logged["model"], logged["version"], logged["arm"]) == ("fraud", 1, "champion")

        # A broken version 3 never replaces what serves; a good version 2 does.
        publish(serve_settings, model_record(fraud_project, 3, seed=2, sha256="0" * 64))
        publish(serve_settings, v2)
        await asyncio.to_thread(registry.wait_for, "fraud", 2, 30.0)
        resp = await client.post("/v1/models/fraud/score", json=body)
        assert resp.status_code == 200 and resp.json()["version"] == 2
        assert resp.json()["score"] != out["score"]
        await asyncio.sleep(0.5)  # v3 was read before v2 and failed: still v2
        assert registry.get("fraud").version == 2  # type: ignore[union-attr]
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert set(models) == set(fraud_project.models)  # every model of the project is listed
        assert (models["fraud"]["champion"], models["fraud"]["failed"]) == (2, [3])
        metrics = (await client.get("/metrics")).text
        assert 'tide_model_load_failures_total{model="fraud"}' in metrics


def predictions_of(settings: ServeSettings, request_id: str, count: int, timeout: float = 15.0) -> list[dict]:
    """The ``count`` prediction records logged for ``request_id`` (champion and shadow)."""
    consumer = reader_from_beginning(
        settings, topic(settings, "predictions"), TOPICS["predictions"].partitions
    )
    found: list[dict] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(found) < count:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    record = codec.decode(msg.value(), "prediction")
                    if record["request_id"] == request_id:
                        found.append(record)
        return found
    finally:
        consumer.close()


async def test_deployments_over_the_topic_reach_every_node(
    serve_settings: ServeSettings, fraud_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Canary, shadow and rollback published through the deployments topic (over HTTP and by the CLI)
    route a node's traffic, and a second node following the same topics routes identically."""
    for name in ("kafka_bootstrap", "topic_prefix"):  # what the CLI reads its settings from
        monkeypatch.setenv(env_var(name), str(getattr(serve_settings, name)))
    publish(serve_settings, *(model_record(fraud_project, v, seed=v) for v in (1, 2, 3)))
    app, other = create_app(serve_settings), create_app(serve_settings)
    registry: ModelRegistry = app.state.registry
    async with (
        app.router.lifespan_context(app),
        other.router.lifespan_context(other),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as client,
    ):
        await asyncio.to_thread(registry.wait_for, "fraud", 3, 30.0)
        resp = await client.post(
            "/v1/models/fraud/deployments", json={"action": "canary", "version": 2, "weight": 0.3}
        )
        assert resp.status_code == 202, resp.text
        await asyncio.to_thread(registry.wait_until, "fraud", lambda r: r.canary is not None, 30.0)
        arms = []
        for start in range(0, 2000, 250):
            batch = {
                "instances": [{"entity": f"c{i}", "features": FEATURES} for i in range(start, start + 250)]
            }
            resp = await client.post("/v1/models/fraud/score", json=batch)
            assert resp.status_code == 200, resp.text
            arms += [(p["arm"], p["version"]) for p in resp.json()["predictions"]]
        assert set(arms) == {("champion", 3), ("canary", 2)}
        assert sum(arm == "canary" for arm, _ in arms) / len(arms) == pytest.approx(0.3, abs=0.04)

        # --model may be left out only when the project has one model (the example has several)
        several = len(fraud_project.models) > 1
        assert cli.main(["deploy", "shadow", "1"]) == (2 if several else 0)
        assert cli.main(["deploy", "shadow", "1", "--model", "fraud", "--reason", "try v1 live"]) == 0
        await asyncio.to_thread(registry.wait_until, "fraud", lambda r: r.shadow is not None, 30.0)
        resp = await client.post("/v1/models/fraud/score", json={"entity": "c1", "features": FEATURES})
        out = resp.json()
        assert out["version"] in (2, 3) and out["arm"] in ("champion", "canary")
        logged = await asyncio.to_thread(predictions_of, serve_settings, out["request_id"], 2)
        assert sorted((r["arm"], r["version"]) for r in logged) == sorted(
            [(out["arm"], out["version"]), ("shadow", 1)]
        )

        assert cli.main(["deploy", "rollback", "--model", "nope"]) == 2  # not a model of the project
        assert (
            cli.main(["deploy", "rollback", "--model", "fraud"]) == 0
        )  # following 3: back to 2, canary ends
        routing = await asyncio.to_thread(
            registry.wait_until, "fraud", lambda r: r.champion.version == 2, 30.0
        )
        assert routing.canary is None and routing.shadow is not None
        await asyncio.to_thread(
            other.state.registry.wait_until, "fraud", lambda r: r.describe() == routing.describe(), 30.0
        )
