"""One node serving every model of a project declared here (not the example): a regression model and a
multiclass model read for two entity types, and a model with no online features. Per-model request
schemas and validation, outputs per task, the prediction log, one store call per request, and the
OpenAPI document."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
import jsonschema_rs
import orjson
import pytest
from river import compose, linear_model, preprocessing

from features import tiles
from features.store import FeatureRow
from infra.errors import RequestError
from models.artifacts import dump_river
from models.inputs import ModelInputs, model_inputs
from models.runtime import LoadedModel, load_model
from schemas import codec
from schemas.definitions import Entity, Feature, FeatureView, Labels, Model, Project, Source
from serving.app import create_app
from serving.coalesce import CoalescingReader
from serving.deployments import bucket, deployment_record
from serving.registry import ModelRegistry
from serving.settings import ServeSettings
from serving.validation import RequestSchema

VISITS: dict[str, Any] = {
    "type": "record",
    "name": "Visit",
    "namespace": "test.shop",
    "fields": [
        {"name": "visit_id", "type": "string", "doc": "Unique id of the visit."},
        {"name": "user_id", "type": "string", "doc": "Who visited."},
        {"name": "shop_id", "type": "long", "doc": "Which shop (a number)."},
        {"name": "basket", "type": "double", "doc": "Value of the basket."},
        {"name": "device", "type": "string", "doc": "Device the visit came from."},
        {"name": "coupon", "type": ["null", "string"], "default": None, "doc": "Coupon used, if any."},
        {"name": "ts", "type": "long"},
    ],
}
OUTCOMES: dict[str, Any] = {
    "type": "record",
    "name": "Outcome",
    "namespace": "test.shop",
    "fields": [
        {"name": "visit_id", "type": "string"},
        {"name": "spend", "type": "double"},
        {"name": "segment", "type": "string"},
        {"name": "bought", "type": "boolean"},
        {"name": "ts", "type": "long"},
    ],
}
CLASSES = ["bronze", "silver", "gold"]


def build_project() -> Project:
    visits = Source("visits", VISITS, key="user_id", event_time="ts")
    outcomes = Source("outcomes", OUTCOMES, key="visit_id", event_time="ts")
    user = Entity("user", "user_id", description="A shopper.")
    shop = Entity("shop", "shop_id", description="A shop.")
    user_recent = FeatureView(
        "user_recent",
        visits,
        user,
        [Feature("visits_1h", "count"), Feature("basket_mean_1h", "mean", "basket")],
        window="1h",
    )
    user_profile = FeatureView(
        "user_profile", visits, user, [Feature("last_device", "last", "device", default="")], kind="lifetime"
    )
    shop_daily = FeatureView(
        "shop_daily",
        visits,
        shop,
        [Feature("shop_visits_today", "count"), Feature("shop_basket_today", "sum", "basket")],
        kind="tumbling",
        window="1d",
    )
    spend = Model(
        name="spend",
        task="regression",
        request=visits,
        request_fields=["basket", "coupon"],
        features=["user_recent.visits_1h", "user_recent.basket_mean_1h", "shop_daily.shop_visits_today"],
        labels=Labels("spend_labels", outcomes, "visit_id", "spend", "regression"),
        learner="shop_models:spend",
    )
    segment = Model(
        name="segment",
        task="multiclass",
        request=visits,
        request_fields=["device", "basket"],
        features=["user_profile.last_device", "user_recent.visits_1h", "shop_daily.shop_basket_today"],
        labels=Labels("segment_labels", outcomes, "visit_id", "segment", "multiclass"),
        learner="shop_models:segment",
    )
    bought = Model(
        name="bought",
        task="binary",
        request=visits,
        request_fields=["basket"],
        labels=Labels("bought_labels", outcomes, "visit_id", "bought", "binary"),
        learner="shop_models:bought",
    )
    return Project.of("shop", [spend, segment, bought, user_recent, user_profile, shop_daily])


PROJECT = build_project()
INPUTS: dict[str, ModelInputs] = model_inputs(PROJECT)
ONLINE = {
    ("user_recent", "u1"): {"visits_1h": 4.0, "basket_mean_1h": 25.0},
    ("user_profile", "u1"): {"last_device": "phone"},
    ("shop_daily", "42"): {"shop_visits_today": 120.0, "shop_basket_today": 3000.0},
}


def learner(name: str) -> Any:
    numeric = ("basket", "visits_1h", "basket_mean_1h", "shop_visits_today", "shop_basket_today")
    head = {
        "spend": linear_model.LinearRegression(),
        "segment": linear_model.SoftmaxRegression(),
        "bought": linear_model.LogisticRegression(),
    }[name]
    model = (
        compose.Select(*[n for n in numeric if n in INPUTS[name].names])
        | preprocessing.StandardScaler()
        | head
    )
    for i in range(90):
        x = {
            "basket": 5.0 + (i % 9) * 11,
            "visits_1h": i % 4,
            "basket_mean_1h": 20.0 + i % 5,
            "shop_visits_today": 100 + i % 7,
            "shop_basket_today": 2500.0 + 10 * (i % 6),
        }
        y = {"spend": x["basket"] * 1.5, "segment": CLASSES[i % 3], "bought": i % 2 == 0}[name]
        model.learn_one(x, y)
    return model


def record(name: str, version: int = 1) -> dict[str, Any]:
    blob, digest = dump_river(learner(name))
    return {
        "model": name,
        "version": version,
        "flavor": "river",
        "task": INPUTS[name].task,
        "classes": CLASSES if name == "segment" else [],
        "artifact": blob,
        "sha256": digest,
        "feature_names": list(INPUTS[name].names),
        "created_ts": int(time.time() * 1000),
        "definitions_digest": PROJECT.digest(),
    }


class CountingStore:
    """Online store double: fixed rows per (view, entity); each read_pairs call is one script call."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []

    async def read_pairs(self, pairs: Sequence[tuple[FeatureView, str]]) -> list[FeatureRow]:
        self.calls.append([(view.name, entity) for view, entity in pairs])
        await asyncio.sleep(0)
        out = []
        for view, entity in pairs:
            values = ONLINE.get((view.name, entity))
            if values is None:
                out.append(
                    FeatureRow(entity, view.name, tiles.window_values(view, {}, 0), "missing", None, None, {})
                )
            else:
                out.append(FeatureRow(entity, view.name, dict(values), "present", 1, 9, view.describe()))
        return out

    async def ping(self) -> bool:
        return True


class Log:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))


@pytest.fixture(scope="module")
def loaded() -> dict[str, LoadedModel]:
    return {name: load_model(record(name), INPUTS[name]) for name in INPUTS}


@pytest.fixture
def registry(loaded: dict[str, LoadedModel]) -> ModelRegistry:
    reg = ModelRegistry(known=INPUTS)
    for model in loaded.values():
        reg.swap(model)
    return reg


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
async def client(registry: ModelRegistry, store: CountingStore, log: Log) -> AsyncIterator[httpx.AsyncClient]:
    async def deployer(deployment: dict[str, Any]) -> None:
        registry.deploy(deployment)

    app = create_app(
        ServeSettings(), project=PROJECT, registry=registry, store=store, predlog=log, deployer=deployer
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        yield c


SPEND = {
    "entities": {"user_id": "u1", "shop_id": 42},
    "event_id": "v-1",
    "features": {"basket": 30.0, "coupon": None},
}
SEGMENT = {"entities": {"user_id": "u1", "shop_id": "42"}, "features": {"device": "phone", "basket": 30}}
BOUGHT = {"features": {"basket": 12.0}}


# --- outputs per task, one store call ---------------------------------------------------------------------


async def test_regression_reads_two_views_of_two_entities_in_one_call(
    client: httpx.AsyncClient, loaded: dict[str, LoadedModel], store: CountingStore, log: Log
):
    resp = await client.post("/v1/models/spend/score", json=SPEND)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    x = {"basket": 30.0, "coupon": None, "visits_1h": 4, "basket_mean_1h": 25.0, "shop_visits_today": 120}
    assert body["features"] == x and isinstance(body["features"]["shop_visits_today"], int)
    assert body["entities"] == {"user_id": "u1", "shop_id": "42"}  # an integer join key, as the store keys it
    assert body["feature_status"] == {"user_recent": "present", "shop_daily": "present"}
    assert body["score"] == pytest.approx(loaded["spend"].runtime.predict_one(x).score)
    assert not 0.0 <= body["score"] <= 1.0  # a value, not a probability
    assert "label" not in body and "probabilities" not in body
    assert store.calls == [[("user_recent", "u1"), ("shop_daily", "42")]]  # exactly one call, both entities
    [logged] = log.records
    assert logged["entities"] == {"user_id": "u1", "shop_id": "42"} and logged["event_id"] == "v-1"
    assert (logged["model"], logged["score"], logged["label"], logged["probabilities"]) == (
        "spend",
        body["score"],
        None,
        None,
    )
    assert codec.decode(codec.encode("prediction", logged), "prediction") == logged


async def test_multiclass_answers_label_and_probabilities(
    client: httpx.AsyncClient, loaded: dict[str, LoadedModel], store: CountingStore, log: Log
):
    resp = await client.post("/v1/models/segment/score", json={"instances": [SEGMENT, SEGMENT]})
    assert resp.status_code == 200, resp.text
    first, second = resp.json()["predictions"]
    x = {
        "device": "phone",
        "basket": 30.0,
        "last_device": "phone",
        "visits_1h": 4,
        "shop_basket_today": 3000.0,
    }
    want = loaded["segment"].runtime.predict_one(x)
    assert first["features"] == x and set(first["probabilities"]) == set(CLASSES)
    assert first["label"] == want.label and first["label"] in CLASSES
    assert first["probabilities"] == pytest.approx(want.probabilities)
    assert first["score"] == pytest.approx(first["probabilities"][first["label"]])
    assert second["label"] == first["label"]
    # two views of the user and one of the shop, each once for the batch, in one call
    assert store.calls == [[("user_profile", "u1"), ("user_recent", "u1"), ("shop_daily", "42")]]
    assert [r["label"] for r in log.records] == [first["label"]] * 2
    assert log.records[0]["probabilities"] == first["probabilities"]
    assert codec.decode(codec.encode("prediction", log.records[0]), "prediction") == log.records[0]


async def test_a_model_without_online_features_reads_nothing(client: httpx.AsyncClient, store: CountingStore):
    resp = await client.post("/v1/models/bought/score", json={"features": {"basket": 12.0}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert 0.0 <= body["score"] <= 1.0 and body["entities"] == {} and body["feature_status"] == {}
    assert store.calls == []
    resp = await client.post(
        "/v1/models/bought/score", json={"entities": {"user_id": "u1"}, "features": {"basket": 1}}
    )
    assert resp.status_code == 422 and resp.json()["field"] == "entities.user_id"


async def test_concurrent_requests_of_different_models_share_one_store_call(
    registry: ModelRegistry, store: CountingStore
):
    app = create_app(
        ServeSettings(), project=PROJECT, registry=registry, store=CoalescingReader(store), predlog=Log()
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        responses = await asyncio.gather(
            c.post("/v1/models/spend/score", json=SPEND), c.post("/v1/models/segment/score", json=SEGMENT)
        )
    assert [r.status_code for r in responses] == [200, 200]
    assert len(store.calls) == 1 and sorted(store.calls[0]) == sorted(
        [("user_recent", "u1"), ("shop_daily", "42"), ("user_profile", "u1")]
    )


# --- validation per model --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        ("spend", {**SPEND, "entities": {"user_id": "u1"}}, "entities.shop_id"),
        ("spend", {**SPEND, "entities": {"user_id": "u1", "shop_id": "abc"}}, "entities.shop_id"),
        ("spend", {**SPEND, "entities": {"user_id": "u1", "shop_id": 4.5}}, "entities.shop_id"),
        ("spend", {**SPEND, "entities": {"user_id": 7, "shop_id": 1}}, "entities.user_id"),
        ("spend", {**SPEND, "entities": {"user_id": "u", "shop_id": 1, "site_id": "s"}}, "entities.site_id"),
        ("spend", {"entity": "u1", "features": SPEND["features"]}, "entity"),  # two join keys: no shorthand
        ("spend", {**SPEND, "features": {"coupon": None}}, "features.basket"),
        ("spend", {**SPEND, "features": {"basket": 1.0}}, "features.coupon"),
        ("spend", {**SPEND, "features": {"basket": 1.0, "coupon": 5}}, "features.coupon"),
        (
            "spend",
            {**SPEND, "features": {"basket": 1.0, "coupon": None, "device": "phone"}},
            "features.device",
        ),
        ("segment", {**SEGMENT, "features": {"device": 3, "basket": 1.0}}, "features.device"),
        (
            "segment",
            {"instances": [SEGMENT, {**SEGMENT, "entities": {"shop_id": 1}}]},
            "instances[1].entities.user_id",
        ),
        (
            "segment",
            {"instances": [SEGMENT, {**SEGMENT, "features": {"basket": 2}}]},
            "instances[1].features.device",
        ),
    ],
)
async def test_each_model_validates_its_own_request(
    client: httpx.AsyncClient, store: CountingStore, log: Log, model: str, body: Any, field: str
):
    resp = await client.post(f"/v1/models/{model}/score", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == field
    assert store.calls == [] and log.records == []


async def test_unknown_model_and_every_model_listed(client: httpx.AsyncClient):
    resp = await client.post("/v1/models/churn/score", json=SPEND)
    assert resp.status_code == 404 and "churn" in resp.json()["error"]
    models = (await client.get("/v1/models")).json()["models"]
    assert [(m["name"], m["champion"]) for m in models] == [("bought", 1), ("segment", 1), ("spend", 1)]
    assert {m["name"]: m["versions"][0]["task"] for m in models} == {
        "bought": "binary",
        "segment": "multiclass",
        "spend": "regression",
    }
    ready = (await client.get("/readyz")).json()
    assert ready == {"status": "ready", "models": {"bought": 1, "segment": 1, "spend": 1}}


async def test_canary_sticks_to_the_entity_values(client: httpx.AsyncClient, registry: ModelRegistry):
    registry.swap(load_model(record("spend", 2), INPUTS["spend"]))
    registry.deploy(deployment_record("spend", "promote", 1))
    assert (
        await client.post(
            "/v1/models/spend/deployments", json={"action": "canary", "version": 2, "weight": 0.5}
        )
    ).status_code == 202
    seen = {}
    for user in range(40):
        for shop in (1, 2):
            body = {**SPEND, "entities": {"user_id": f"u{user}", "shop_id": shop}}
            arm = (await client.post("/v1/models/spend/score", json=body)).json()["arm"]
            assert arm == ("canary" if bucket("spend", f"u{user}\x1f{shop}") < 0.5 else "champion")
            seen[(user, shop)] = arm
    assert set(seen.values()) == {"champion", "canary"}
    assert any(seen[(u, 1)] != seen[(u, 2)] for u in range(40))  # the shop counts, not only the user


# --- the document -------------------------------------------------------------------------------------------


async def test_each_model_is_documented_with_its_own_schemas(client: httpx.AsyncClient):
    doc = (await client.get("/openapi.json")).json()
    assert {p for p in doc["paths"] if p.endswith("/score")} == {
        "/v1/models/bought/score",
        "/v1/models/segment/score",
        "/v1/models/spend/score",
    }
    schemas = doc["components"]["schemas"]
    assert schemas["spend.Entities"]["required"] == ["user_id", "shop_id"]
    assert schemas["spend.Entities"]["properties"]["shop_id"]["type"] == ["integer", "string"]
    assert "entity" not in schemas["spend.Instance"]["properties"]
    assert schemas["spend.Features"]["properties"]["coupon"] == {
        "type": ["string", "null"],
        "description": "Coupon used, if any.",
    }
    assert schemas["segment.Prediction"]["required"][-2:] == ["label", "probabilities"]
    assert "label" not in schemas["spend.Prediction"]["properties"]
    assert schemas["bought.Entities"]["properties"] == {}


BODIES = {
    "spend": [
        SPEND,
        {**SPEND, "entities": {"user_id": "u1", "shop_id": "42"}},
        {**SPEND, "entities": {"user_id": "u1", "shop_id": "-3"}},
        {**SPEND, "entities": {"user_id": "u1", "shop_id": "4x"}},
        {**SPEND, "entities": {"user_id": "u1", "shop_id": ""}},
        {**SPEND, "entities": {"user_id": "u1", "shop_id": 4.5}},
        {**SPEND, "entities": {"user_id": "", "shop_id": 1}},
        {**SPEND, "entities": {"user_id": "u1"}},
        {"entity": "u1", "features": SPEND["features"]},
        {"features": SPEND["features"]},
        {**SPEND, "features": {"basket": 1, "coupon": "c"}},
        {**SPEND, "features": {"basket": 1}},
        {"instances": [SPEND, {**SPEND, "event_id": None}]},
    ],
    "bought": [
        {"features": {"basket": 1.0}},
        {"entities": {}, "features": {"basket": 1.0}},
        {"entities": None, "features": {"basket": 1.0}},
        {"entities": {"user_id": "u"}, "features": {"basket": 1.0}},
        {"entity": "u", "features": {"basket": 1.0}},
    ],
}


@pytest.mark.parametrize(("model", "i"), [(m, i) for m, bodies in BODIES.items() for i in range(len(bodies))])
async def test_request_schema_accepts_exactly_what_the_validator_accepts(
    client: httpx.AsyncClient, model: str, i: int
):
    doc = (await client.get("/openapi.json")).json()
    op = doc["paths"][f"/v1/models/{model}/score"]["post"]
    validator = jsonschema_rs.validator_for(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": doc["components"],
            **op["requestBody"]["content"]["application/json"]["schema"],
        }
    )
    body = BODIES[model][i]
    try:
        RequestSchema(INPUTS[model]).parse_body(orjson.dumps(body))
        accepted = True
    except RequestError as exc:
        accepted = False
        assert exc.status == 422
    assert validator.is_valid(body) == accepted, body


# --- definitions that change while the node runs; lineage ---------------------------------------------------
