"""A serving node follows the registry while it runs, against the real broker and Redis: a view and a
model applied while requests flow are served within seconds with no failed request, a removed model
answers 404, and each model version is scored with the view versions of its lineage."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from river import compose, linear_model

from features import tiles
from features.store import RedisOnlineStore, ViewBatch
from infra.settings import CommonSettings
from models.artifacts import dump_river
from schemas import registry
from schemas.definitions import Feature, FeatureView, Model, Project
from serving.app import create_app
from serving.registry import ModelRegistry
from serving.settings import ServeSettings
from tests.integration.test_serving_live import publish
from tide.embedded import StackInfo

pytestmark = pytest.mark.integration

FEATURES = {"amount": 80.0, "category": "travel", "country": "FR", "card_present": False}


@pytest.fixture
def serve_settings(stack: StackInfo, fraud: CommonSettings) -> ServeSettings:
    return stack.settings(
        ServeSettings, topic_prefix=fraud.topic_prefix, state_dir=fraud.state_dir, project=fraud.project
    )


def version_record(name: str, version: int, feature_names: list[str], **views: int) -> dict[str, Any]:
    """A model version trained on ``views`` (view name -> version); scores differ by ``version``."""
    learner = compose.Select("amount") | linear_model.LogisticRegression()
    for i in range(10 * version):
        learner.learn_one({"amount": float(i % 7) * 30}, i % 3 == 0)
    blob, digest = dump_river(learner)
    return {
        "model": name,
        "version": version,
        "flavor": "river",
        "task": "binary",
        "artifact": blob,
        "sha256": digest,
        "feature_names": feature_names,
        "metric_name": "rocauc",
        "trained_on": 10 * version,
        "created_ts": int(time.time() * 1000),
        "view_versions": dict(views),
    }


def apply(settings: ServeSettings, project: Project) -> int:
    """Register ``project`` as the next registry version (what ``tide apply`` ends with)."""
    current = registry.latest(settings)
    version = (current.version if current else 0) + 1
    project.validate()
    registry.publish(settings, project, version)
    return version


def with_view_version(project: Project, name: str, **changes: Any) -> Project:
    """``project`` with a new version of view ``name`` (a breaking change), the old version kept."""
    old = project.views[name]
    new = dataclasses.replace(old, version=old.version + 1, **changes)
    return dataclasses.replace(
        project, views={**project.views, name: new}, previous_views={**project.previous_views, old.ref: old}
    )


async def until(check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> float:
    """Seconds until ``check()`` (awaited when it returns an awaitable) is true; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


async def test_a_view_and_a_model_applied_while_requests_flow(
    serve_settings: ServeSettings, fraud_project: Project
) -> None:
    fraud = fraud_project.models["fraud"]
    publish(serve_settings, version_record("fraud", 1, list(fraud.input_names)))
    app = create_app(serve_settings)
    models: ModelRegistry = app.state.registry
    statuses: list[int] = []
    done = asyncio.Event()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as client,
    ):
        await asyncio.to_thread(models.wait_for, "fraud", 1, 30.0)

        async def steady() -> None:  # a client that never stops sending to the model that stays
            i = 0
            while not done.is_set():
                resp = await client.post(
                    "/v1/models/fraud/score", json={"entity": f"c{i % 50}", "features": FEATURES}
                )
                statuses.append(resp.status_code)
                i += 1
                await asyncio.sleep(0.005)

        flow = asyncio.create_task(steady())
        card = fraud_project.views["card_activity"]
        big = FeatureView(
            "card_big_spend",
            card.source,
            card.entity,
            [Feature("amount_max_6h", "max", "amount")],
            window="6h",
            tile="5m",
        )
        lite = Model(
            name="fraud_lite",
            task="binary",
            request=fraud.request,
            request_fields=["amount"],
            features=["card_big_spend.amount_max_6h"],
            labels=fraud.labels,
            learner=fraud.learner,
        )
        added = dataclasses.replace(
            fraud_project,
            views={**fraud_project.views, big.name: big},
            models={**fraud_project.models, lite.name: lite},
        )
        lite_body = {"entity": "c1", "features": {"amount": 12.0}}
        assert (await client.post("/v1/models/fraud_lite/score", json=lite_body)).status_code == 404
        await asyncio.to_thread(apply, serve_settings, added)

        async def documented() -> bool:
            return "/v1/models/fraud_lite/score" in (await client.get("/openapi.json")).json()["paths"]

        await until(documented, what="the new model in /openapi.json")
        assert (await client.post("/v1/models/fraud_lite/score", json=lite_body)).status_code == 503
        publish(
            serve_settings, version_record("fraud_lite", 1, ["amount", "amount_max_6h"], card_big_spend=1)
        )

        async def serves() -> bool:
            return (await client.post("/v1/models/fraud_lite/score", json=lite_body)).status_code == 200

        assert await until(serves, what="the new model answering") < 10
        out = (await client.post("/v1/models/fraud_lite/score", json=lite_body)).json()
        assert out["features"] == {"amount": 12.0, "amount_max_6h": None}  # nothing computed for c1 yet
        assert out["feature_status"] == {"card_big_spend": "missing"}
        assert (await client.get("/readyz")).status_code == 200

        await asyncio.to_thread(apply, serve_settings, fraud_project)  # removed again

        async def gone() -> bool:
            return (await client.post("/v1/models/fraud_lite/score", json=lite_body)).status_code == 404

        await until(gone, what="the removed model answering 404")
        listed = {m["name"] for m in (await client.get("/v1/models")).json()["models"]}
        assert listed == set(fraud_project.models)  # its versions dropped
        assert (await client.get("/readyz")).status_code == 200
        done.set()
        await flow
    assert len(statuses) > 50 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


async def test_each_version_is_scored_with_the_view_versions_it_was_trained_on(
    serve_settings: ServeSettings, fraud_project: Project
) -> None:
    """A version trained on card_activity@1 keeps reading @1 after @2 exists; one trained on @2 reads
    @2; one naming a version the registry does not keep (unknown, or retired) is refused and the one
    serving keeps serving."""
    entity = f"card-{uuid.uuid4().hex[:10]}"
    changed = with_view_version(fraud_project, "card_activity", allowed_lateness="10m")
    v1, v2 = fraud_project.views["card_activity"], changed.views["card_activity"]
    assert (v1.ref, v2.ref) == ("card_activity@1", "card_activity@2")
    now = int(time.time() * 1000)

    def events(n: int) -> list[dict[str, Any]]:
        return [
            {
                "event_id": f"e{i}",
                "card_id": entity,
                "amount": 10.0 * (i + 1),
                "merchant_id": f"m{i}",
                "category": "travel",
                "country": "FR",
                "card_present": False,
                "ts": now - 5_000 + i,
            }
            for i in range(n)
        ]

    store = RedisOnlineStore.from_url(serve_settings.redis_url, serve_settings.topic_prefix)
    for view, n in ((v1, 2), (v2, 3)):  # the two versions hold different values for the same card
        deltas = tiles.record_deltas(view, enumerate(events(n)))
        assert await store.apply([ViewBatch(view, "events:0", deltas, n - 1, now)]) == []
    await store.close()

    fraud = list(fraud_project.models["fraud"].input_names)
    trained_on = {"card_daily": 1, "card_profile": 1}
    publish(serve_settings, version_record("fraud", 1, fraud, card_activity=1, **trained_on))
    app = create_app(serve_settings)
    models: ModelRegistry = app.state.registry
    body = {"entity": entity, "features": FEATURES}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as client,
    ):
        await asyncio.to_thread(models.wait_for, "fraud", 1, 30.0)

        async def served() -> tuple[int, int]:
            out = (await client.post("/v1/models/fraud/score", json=body)).json()
            return out["version"], out["features"]["txn_count_1h"]

        assert await served() == (1, 2)
        await asyncio.to_thread(apply, serve_settings, changed)
        await until(lambda: app.state.service.catalog.version == 2, what="definitions v2 taken up")
        assert await served() == (1, 2)  # still card_activity@1, though @2 is the newest

        publish(serve_settings, version_record("fraud", 2, fraud, card_activity=2, **trained_on))
        await asyncio.to_thread(models.wait_for, "fraud", 2, 30.0)
        assert await served() == (2, 3)

        publish(serve_settings, version_record("fraud", 3, fraud, card_activity=7, **trained_on))
        retired = dataclasses.replace(changed, previous_views={})  # card_activity@1 retired
        await asyncio.to_thread(apply, serve_settings, retired)
        await until(lambda: app.state.service.catalog.version == 3, what="definitions v3 taken up")
        publish(serve_settings, version_record("fraud", 4, fraud, card_activity=1, **trained_on))

        def refused() -> bool:
            [fraud_model] = [m for m in models.describe() if m["name"] == "fraud"]
            # 1, kept loaded for a rollback, read card_activity@1 too: dropped with it
            return set(fraud_model["refused"]) == {"1", "3", "4"}

        await until(refused, what="versions 1, 3 and 4 refused")
        assert await served() == (2, 3)  # the champion before them keeps serving
        [fraud_model] = [m for m in models.describe() if m["name"] == "fraud"]
        assert "card_activity@7" in fraud_model["refused"]["3"]
        assert "card_activity@1" in fraud_model["refused"]["4"]
        metrics = (await client.get("/metrics")).text
        assert 'tide_model_lineage_refused_total{model="fraud"}' in metrics
