"""Serving under evolving definitions: each model version is scored with the view versions its lineage
names, refused when they are not kept, and models come and go while requests flow."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from features.store import FeatureRow
from infra.deadletter import MemoryDeadLetters
from infra.errors import LineageMismatch
from models.runtime import load_model
from schemas import codec
from schemas.definitions import FeatureView, Project
from serving.app import create_app
from serving.deployments import deployment_record
from serving.follower import ModelFollower
from serving.lineage import pinned_inputs
from serving.registry import ModelRegistry
from serving.registry import Source as At
from serving.settings import ServeSettings
from tests.unit.test_serving_project import (
    BOUGHT,
    INPUTS,
    PROJECT,
    SEGMENT,
    SPEND,
    CountingStore,
    Log,
    record,
)


def new_version(project: Project, view: str, **changes: Any) -> Project:
    """``project`` with a new version of ``view`` (``changes`` applied), the old one kept."""
    old = project.views[view]
    new = dataclasses.replace(old, version=old.version + 1, **changes)
    changed = dataclasses.replace(
        project, views={**project.views, view: new}, previous_views={**project.previous_views, old.ref: old}
    )
    changed.validate()
    return changed


def lineage(name: str, version: int, **views: int) -> dict[str, Any]:
    """A record of ``name`` trained on ``views`` (view name -> version), as the models topic holds it."""
    return {**record(name, version), "metric_name": "mae", "trained_on": 90, "view_versions": dict(views)}


class VersionedStore(CountingStore):
    """Rows per view version: version 2 of user_recent holds other values than version 1."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[list[str]] = []

    async def read_pairs(self, pairs: Sequence[tuple[FeatureView, str]]) -> list[FeatureRow]:
        self.refs.append([f"{view.ref}/{entity}" for view, entity in pairs])
        rows = await super().read_pairs(pairs)
        return [
            dataclasses.replace(row, values={"visits_1h": 9.0, "basket_mean_1h": 99.0})
            if view.ref == "user_recent@2"
            else row
            for (view, _), row in zip(pairs, rows, strict=True)
        ]


TWO_HOURS = new_version(PROJECT, "user_recent", window="2h")


def test_pinned_inputs_read_the_view_versions_of_the_lineage():
    pinned = pinned_inputs(TWO_HOURS, lineage("spend", 1, user_recent=1, shop_daily=1))
    assert [v.ref for v in pinned.views] == ["user_recent@1", "shop_daily@1"]
    assert pinned.names == INPUTS["spend"].names
    # no lineage (a record older than it): the views' current versions
    assert [v.ref for v in pinned_inputs(TWO_HOURS, record("spend")).views] == [
        "user_recent@2",
        "shop_daily@1",
    ]
    # its own inputs: trained on fewer features than the model is defined with now
    fewer = {**lineage("spend", 2, user_recent=1), "feature_names": ["basket", "visits_1h"]}
    assert pinned_inputs(TWO_HOURS, fewer).names == ("basket", "visits_1h")
    refused = {
        "user_recent@3": lineage("spend", 3, user_recent=3, shop_daily=1),  # not kept (retired, or not yet)
        "neither a request field": {
            **lineage("spend", 4, user_recent=1),
            "feature_names": ["basket", "nope"],
        },
        "shop_visits_today": lineage("spend", 5, user_recent=1),  # its lineage names no view that has it
        "regression": {**record("spend", 6), "task": "binary"},
    }
    for reason, rec in refused.items():
        with pytest.raises(LineageMismatch, match=reason):
            pinned_inputs(TWO_HOURS, rec)


async def test_each_version_is_scored_with_its_own_view_versions_in_one_read():
    """v1 trained on user_recent@1 keeps reading @1 after @2 exists; v2 reads @2; a version naming a
    view version not kept is refused, counted, and never served; the shadow reads its own version in the
    same store call."""
    store, log, registry = VersionedStore(), Log(), ModelRegistry()
    app = create_app(ServeSettings(), project=TWO_HOURS, registry=registry, store=store, predlog=log)
    service = app.state.service
    follower = ModelFollower(
        ServeSettings(), registry, lineage=service.lineage, dead_letters=MemoryDeadLetters()
    )
    offsets = iter(range(100))

    def publish(*records: dict[str, Any]) -> None:
        follower.apply((codec.encode("model_version", r), At("models", 0, next(offsets))) for r in records)

    refused = REGISTRY.get_sample_value("tide_model_lineage_refused_total", {"model": "spend"}) or 0.0
    publish(lineage("spend", 1, user_recent=1, shop_daily=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as client:
        body = (await client.post("/v1/models/spend/score", json=SPEND)).json()
        assert (body["version"], body["features"]["visits_1h"]) == (1, 4)
        assert store.refs == [["user_recent@1/u1", "shop_daily@1/42"]]
        publish(lineage("spend", 2, user_recent=9, shop_daily=1))  # names a version not kept: refused
        assert registry.get("spend").version == 1  # type: ignore[union-attr]
        publish(lineage("spend", 3, user_recent=2, shop_daily=1))
        body = (await client.post("/v1/models/spend/score", json=SPEND)).json()
        assert (body["version"], body["features"]["visits_1h"]) == (3, 9)
        registry.deploy(deployment_record("spend", "shadow", 1))
        store.refs.clear()
        body = (await client.post("/v1/models/spend/score", json=SPEND)).json()
        await asyncio.sleep(0.05)  # the shadow scores after the response
        assert store.refs == [["user_recent@2/u1", "shop_daily@1/42", "user_recent@1/u1"]]  # one call
        shadow = [r for r in log.records if r["arm"] == "shadow"]
        assert [(r["version"], r["features"]["visits_1h"]) for r in shadow] == [(1, 4)]
        [described] = [m for m in (await client.get("/v1/models")).json()["models"] if m["name"] == "spend"]
        assert list(described["refused"]) == ["2"] and "user_recent@9" in described["refused"]["2"]
    after = REGISTRY.get_sample_value("tide_model_lineage_refused_total", {"model": "spend"})
    assert after == refused + 1


async def test_definitions_change_while_requests_flow():
    """A model added is documented and served once a version loads, a removed one answers 404, and a
    steady stream of requests to a model that stays never fails across the changes."""
    store, registry = CountingStore(), ModelRegistry()
    before = dataclasses.replace(PROJECT, models={k: v for k, v in PROJECT.models.items() if k != "bought"})
    app = create_app(ServeSettings(), project=before, registry=registry, store=store, predlog=Log())
    service = app.state.service
    registry.swap(load_model(record("spend"), INPUTS["spend"]))
    registry.swap(load_model(record("segment"), INPUTS["segment"]))
    statuses: list[int] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as client:

        async def steady() -> None:
            while not done.is_set():
                statuses.append((await client.post("/v1/models/spend/score", json=SPEND)).status_code)
                await asyncio.sleep(0)

        async def more(n: int = 5) -> None:  # the stream goes on across each change
            target = len(statuses) + n
            while len(statuses) < target:
                await asyncio.sleep(0.001)

        flow = asyncio.create_task(steady())
        await more()
        assert (await client.post("/v1/models/bought/score", json=BOUGHT)).status_code == 404
        await asyncio.to_thread(service.apply_definitions, TWO_HOURS, 2)  # bought added, user_recent@2
        await more()
        assert "/v1/models/bought/score" in (await client.get("/openapi.json")).json()["paths"]
        resp = await client.post("/v1/models/bought/score", json=BOUGHT)
        assert resp.status_code == 503  # defined, no version yet
        registry.swap(load_model(record("bought"), INPUTS["bought"]))
        assert (await client.post("/v1/models/bought/score", json=BOUGHT)).status_code == 200
        without = dataclasses.replace(
            TWO_HOURS, models={k: v for k, v in TWO_HOURS.models.items() if k != "segment"}
        )
        await asyncio.to_thread(service.apply_definitions, without, 3)
        await more()
        assert (await client.post("/v1/models/segment/score", json=SEGMENT)).status_code == 404
        assert "segment" not in {m["name"] for m in (await client.get("/v1/models")).json()["models"]}
        assert registry.swap(load_model(record("segment", 2), INPUTS["segment"])) is False  # ignored now
        body = (await client.post("/v1/models/spend/score", json=SPEND)).json()
        assert body["features"]["visits_1h"] == 4  # a version without lineage reads the current version
        assert store.calls[-1][0] == ("user_recent", "u1")
        ready = (await client.get("/readyz")).json()
        assert ready == {"status": "ready", "models": {"bought": 1, "spend": 1}}
        done.set()
        await flow
    assert len(statuses) >= 15 and set(statuses) == {200}
