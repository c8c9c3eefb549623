"""Deployments that cannot silently stick, against the real broker and Redis: a version never published
answers 409 and new versions keep serving; a deployment on the topic naming an unknown version is shown
pending, then refused, the champion unchanged; an unblessed version never becomes champion under follow;
GET versions lists lineage and canary verdicts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from infra.settings import CommonSettings
from schemas import codec
from schemas.definitions import Project
from serving.app import create_app
from serving.deployments import deployment_record, publish_deployment
from serving.registry import ModelRegistry
from serving.settings import ServeSettings
from tests.integration.test_serving_live import model_record, publish
from tide.embedded import StackInfo

pytestmark = pytest.mark.integration

PENDING_S = 3.0


@pytest.fixture
def serve_settings(stack: StackInfo, fraud: CommonSettings) -> ServeSettings:
    return stack.settings(
        ServeSettings,
        topic_prefix=fraud.topic_prefix,
        state_dir=fraud.state_dir,
        project=fraud.project,
        serve_deployment_pending_s=PENDING_S,
    )


def blessed(record: dict[str, Any], ok: bool) -> dict[str, Any]:
    reason = "rocauc 0.71 >= baseline 0.70 - 0.01" if ok else "rocauc 0.52 < baseline 0.70 - 0.01"
    return {
        **record,
        "parent_version": record["version"] - 1,
        "trigger": "concept drift alert a-1",
        "data": {"first_ts": 1, "last_ts": 2, "offsets": {"events:0": 120}},
        "blessing": {"blessed": ok, "reason": reason, "metric": "rocauc", "window_labels": 400},
    }


def send(settings: ServeSettings, name: str, kind: str, *records: dict[str, Any]) -> None:
    from infra.topics import topic

    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for record in records:
        producer.produce(
            topic(settings, name), key=record["model"].encode(), value=codec.encode(kind, record)
        )
    assert producer.flush(10) == 0


@contextlib.asynccontextmanager
async def serving(settings: ServeSettings) -> AsyncIterator[tuple[httpx.AsyncClient, ModelRegistry]]:
    """A serving app in process (its lifespan run) and a client of it, once version 1 serves."""
    app = create_app(settings)
    registry: ModelRegistry = app.state.registry
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as client,
    ):
        await asyncio.to_thread(registry.wait_for, "fraud", 1, 30.0)
        yield client, registry


async def until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_promoting_a_version_never_published_is_refused_and_new_versions_keep_serving(
    serve_settings: ServeSettings, fraud_project: Project
) -> None:
    publish(serve_settings, model_record(fraud_project, 1, seed=1))
    async with serving(serve_settings) as (client, registry):
        url = "/v1/models/fraud/deployments"
        resp = await client.post(url, json={"action": "promote", "version": 99999})
        assert resp.status_code == 409, resp.text
        assert resp.json()["reason"] == "version 99999 was never published for model 'fraud'"
        resp = await client.post(url, json={"action": "rollback"})
        assert resp.status_code == 409 and "nothing to roll back to" in resp.json()["reason"]

        # An accepted one: its outcome, read back from the topic, is at its Location.
        resp = await client.post(url, json={"action": "promote", "version": 1, "reason": "pin"})
        assert resp.status_code == 202, resp.text
        location = resp.headers["location"]

        async def applied() -> bool:
            got = (await client.get(location)).json()
            return bool(got["status"] == "applied")

        await until(applied)
        resp = await client.post(url, json={"action": "follow"})
        assert resp.status_code == 202
        await until(lambda: _status(client, resp.headers["location"], "applied"))

        publish(serve_settings, model_record(fraud_project, 2, seed=2))  # follow: 2 serves
        await asyncio.to_thread(registry.wait_for, "fraud", 2, 30.0)
        score = await client.post(
            "/v1/models/fraud/score",
            json={
                "entity": "c1",
                "features": {"amount": 1.0, "category": "travel", "country": "FR", "card_present": False},
            },
        )
        assert score.status_code == 200 and score.json()["version"] == 2
        assert (await client.get("/readyz")).status_code == 200
        listed = (await client.get(url)).json()["deployments"]
        assert [(d["action"], d["source"], d["status"]) for d in listed] == [
            ("follow", "api", "applied"),
            ("promote", "api", "applied"),
        ]


async def _status(client: httpx.AsyncClient, location: str, status: str) -> bool:
    return bool((await client.get(location)).json()["status"] == status)


async def test_a_deployment_on_the_topic_naming_an_unknown_version_is_pending_then_refused(
    serve_settings: ServeSettings, fraud_project: Project
) -> None:
    publish(serve_settings, model_record(fraud_project, 1, seed=1))
    async with serving(serve_settings) as (client, registry):
        record = deployment_record("fraud", "promote", 77, reason="verdict v-9 passed", source="judge")
        await asyncio.to_thread(publish_deployment, serve_settings, record)
        location = f"/v1/models/fraud/deployments/{record['id']}"

        async def shown_pending() -> bool:
            models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
            return [p["id"] for p in models["fraud"]["pending"]] == [record["id"]]

        await until(shown_pending)
        got = (await client.get(location)).json()
        assert got["status"] == "pending" and got["source"] == "judge"
        assert registry.get("fraud").version == 1  # type: ignore[union-attr]
        assert (await client.get("/readyz")).status_code == 200  # the champion was never pinned to 77

        await until(lambda: _status(client, location, "refused"), timeout=PENDING_S + 15)
        got = (await client.get(location)).json()
        assert got["status_reason"] == f"version 77 was not published within {PENDING_S:g} s"
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert models["fraud"]["pending"] == [] and models["fraud"]["policy"]["champion"] == "newest"
        publish(serve_settings, model_record(fraud_project, 2, seed=2))
        await asyncio.to_thread(registry.wait_for, "fraud", 2, 30.0)


async def test_unblessed_versions_never_serve_under_follow_and_versions_list_lineage_and_verdicts(
    serve_settings: ServeSettings, fraud_project: Project
) -> None:
    v1 = model_record(fraud_project, 1, seed=1)
    v2 = blessed(model_record(fraud_project, 2, seed=2), ok=False)
    publish(serve_settings, v1, v2)
    verdict = {
        "verdict_id": "v-1",
        "model": "fraud",
        "version": 2,
        "champion_version": 1,
        "arm": "shadow",
        "outcome": "fail",
        "rule": "inferiority",
        "metric": "log_loss",
        "estimate": 0.05,
        "lower": 0.02,
        "upper": 0.08,
        "margin": 0.01,
        "alpha": 0.05,
        "n": 300,
        "duration_ms": 60_000,
        "ts": int(time.time() * 1000),
    }
    send(serve_settings, "canary-verdicts", "canary_verdict", verdict)
    async with serving(serve_settings) as (client, registry):

        async def versions() -> list[dict[str, Any]] | None:
            listed = (await client.get("/v1/models/fraud/versions")).json()["versions"]
            return listed if len(listed) == 2 and listed[1]["verdicts"] else None

        one, two = await until(versions)
        assert (one["version"], one["status"], one["blessing"]) == (1, "champion", None)
        assert (two["status"], two["status_reason"]) == ("unblessed", "rocauc 0.52 < baseline 0.70 - 0.01")
        assert two["parent_version"] == 1 and two["trigger"] == "concept drift alert a-1"
        assert (
            two["data"]["offsets"] == {"events:0": 120}
            and two["definitions_digest"] == fraud_project.digest()
        )
        assert [(v["verdict_id"], v["outcome"]) for v in two["verdicts"]] == [("v-1", "fail")]
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert models["fraud"]["unblessed"] == {"2": "rocauc 0.52 < baseline 0.70 - 0.01"}
        assert registry.get("fraud").version == 1  # type: ignore[union-attr]
        resp = await client.post("/v1/models/fraud/deployments", json={"action": "promote", "version": 2})
        assert resp.status_code == 409 and "not blessed" in resp.json()["reason"]

        publish(serve_settings, blessed(model_record(fraud_project, 3, seed=3), ok=True))
        await asyncio.to_thread(registry.wait_for, "fraud", 3, 30.0)
