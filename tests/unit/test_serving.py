"""The scoring service with in-memory doubles: validation, scoring, logging, hot swaps and model loading."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from river import linear_model

from features import tiles
from features.store import FeatureRow
from infra.deadletter import MemoryDeadLetters
from infra.errors import ConfigError, ModelLoadError, ServingError
from infra.imports import import_object
from infra.settings import load
from models.artifacts import dump_river
from models.inputs import ModelInputs, model_inputs
from models.runtime import LoadedModel, load_model, make_loader
from schemas import codec
from schemas.definitions import FeatureView, Project
from serving.app import create_app
from serving.follower import ModelFollower
from serving.predlog import PredictionLog
from serving.registry import ModelRegistry, Source
from serving.settings import ServeSettings

MODEL = "fraud"
ENTITY = "card-000001"
FEATURES = {"amount": 12.5, "category": "grocery", "country": "US", "card_present": True}
ONLINE = {  # what the store holds, by view (counts come back as floats; they are served as integers)
    "card_activity": {
        "txn_count_1h": 3.0,
        "amount_sum_1h": 60.0,
        "amount_mean_1h": 20.0,
        "amount_max_1h": 30.0,
        "amount_std_1h": 8.0,
        "merchants_1h": 2.0,
    },
    "card_daily": {"txn_count_today": 5.0, "amount_p90_today": 28.0, "amount_min_today": 10.0},
    "card_profile": {"txn_count_lifetime": 40.0, "last_category": "grocery", "countries_lifetime": 2.0},
}
SERVED = {  # the model's inputs from those rows
    "txn_count_1h": 3,
    "amount_sum_1h": 60.0,
    "amount_mean_1h": 20.0,
    "amount_max_1h": 30.0,
    "amount_std_1h": 8.0,
    "merchants_1h": 2.0,
    "txn_count_today": 5,
    "txn_count_lifetime": 40,
}
VIEWS = ("card_activity", "card_daily", "card_profile")


# --- doubles and builders ----------------------------------------------------------------------------------


class FakeStore:
    """Online store double: fixed rows per (view, entity), a record of every call, optional delay or
    failure."""

    def __init__(
        self, rows: Mapping[str, Mapping[str, dict[str, float]]] | None = None, delay: float = 0.0
    ) -> None:
        self.rows = {entity: dict(views) for entity, views in (rows or {}).items()}
        self.delay = delay
        self.fail: Exception | None = None
        self.calls: list[list[tuple[str, str]]] = []
        self.pings = 0

    async def read_pairs(self, pairs: Sequence[tuple[FeatureView, str]]) -> list[FeatureRow]:
        self.calls.append([(view.name, entity) for view, entity in pairs])
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        out = []
        for view, entity in pairs:
            values = self.rows.get(entity, {}).get(view.name)
            if values is None:
                empty = tiles.window_values(view, {}, 0)
                out.append(FeatureRow(entity, view.name, empty, "missing", None, None, view.describe()))
            else:
                out.append(
                    FeatureRow(entity, view.name, dict(values), "present", 1_000, 250, view.describe())
                )
        return out

    async def ping(self) -> bool:
        self.pings += 1
        return True


class FakeLog:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))


@pytest.fixture(scope="module")
def project(fraud_project: Project) -> Project:
    return fraud_project


@pytest.fixture(scope="module")
def inputs(project: Project) -> ModelInputs:
    return model_inputs(project)[MODEL]


def new_learner(project: Project) -> Any:
    """A fresh learner of the model's factory (the project's code, as a trainer builds it)."""
    return import_object(str(project.models[MODEL].learner))()


def trained_model(project: Project, seed: int, steps: int = 50) -> Any:
    """A learner whose scores depend on ``seed``, so versions built from different seeds differ."""
    rng = random.Random(seed)
    model = new_learner(project)
    for _ in range(steps):
        x = {**FEATURES, **SERVED, "amount": rng.uniform(1, 500), "card_present": rng.random() < 0.5}
        model.learn_one(x, rng.random() < 0.3)
    return model


def model_record(version: int, learner: Any, **overrides: Any) -> dict[str, Any]:
    """A ModelVersion-shaped record around a river learner."""
    blob, digest = dump_river(learner)
    record = {
        "model": MODEL,
        "version": version,
        "flavor": "river",
        "task": "binary",
        "artifact": blob,
        "artifact_uri": None,
        "sha256": digest,
        "feature_names": [],
        "metric_name": "rocauc",
        "metric_value": None,
        "trained_on": 0,
        "reference": None,
        "created_ts": int(time.time() * 1000),
    }
    record.update(overrides)
    return record


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def instance(entity: str = ENTITY, **features: Any) -> dict[str, Any]:
    return {"entity": entity, "event_id": "ev-1", "features": {**FEATURES, **features}}


@pytest.fixture
def settings() -> ServeSettings:
    return ServeSettings(serve_request_timeout_s=0.5, serve_max_body_bytes=4096)


@pytest.fixture
def registry(project: Project, inputs: ModelInputs) -> ModelRegistry:
    reg = ModelRegistry(known=[MODEL])
    reg.swap(load_model(model_record(1, trained_model(project, 1)), inputs))
    return reg


@pytest.fixture
def store() -> FakeStore:
    return FakeStore({ENTITY: ONLINE})


@pytest.fixture
def predlog() -> FakeLog:
    return FakeLog()


@pytest.fixture
async def client(
    settings: ServeSettings, project: Project, registry: ModelRegistry, store: FakeStore, predlog: FakeLog
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, project=project, registry=registry, store=store, predlog=predlog)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        yield c


SCORE = f"/v1/models/{MODEL}/score"


# --- happy paths -------------------------------------------------------------------------------------------


async def test_score_one(
    client: httpx.AsyncClient, registry: ModelRegistry, store: FakeStore, predlog: FakeLog
):
    resp = await client.post(SCORE, json=instance())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected_x = {**FEATURES, **SERVED}
    assert body["model"] == MODEL and body["version"] == 1 and body["arm"] == "champion"
    assert body["features"] == expected_x and list(body["features"]) == list(expected_x)
    assert isinstance(body["features"]["txn_count_1h"], int)
    assert body["entities"] == {"card_id": ENTITY}
    assert body["feature_status"] == dict.fromkeys(VIEWS, "present")
    assert body["feature_age_ms"] == dict.fromkeys(VIEWS, 250)
    assert "label" not in body and "probabilities" not in body  # a binary model answers a probability
    model = registry.get(MODEL)
    assert model is not None
    assert body["score"] == pytest.approx(model.runtime.predict_one(expected_x).score)
    assert resp.headers["x-request-id"] == body["request_id"] and len(body["request_id"]) == 32
    assert (await client.post(SCORE, json=instance())).json()["request_id"] != body["request_id"]
    # one store call per request, for the three views of the card
    assert store.calls == [[(view, ENTITY) for view in VIEWS]] * 2
    logged = predlog.records[0]
    assert logged["request_id"] == body["request_id"]
    assert logged["event_id"] == "ev-1" and logged["entities"] == {"card_id": ENTITY}
    assert logged["features"] == expected_x and logged["score"] == body["score"]
    assert logged["label"] is None and logged["probabilities"] is None
    assert logged["version"] == 1 and logged["arm"] == "champion" and logged["latency_ms"] > 0
    # What is logged is a valid Prediction record, and survives the codec unchanged (counts as integers).
    decoded = codec.decode(codec.encode("prediction", logged), "prediction")
    assert decoded == logged and isinstance(decoded["features"]["txn_count_today"], int)


async def test_score_by_entities_uses_given_request_id_and_missing_features(
    client: httpx.AsyncClient, predlog: FakeLog
):
    body = {"entities": {"card_id": "card-unknown"}, "features": {**FEATURES, "amount": 7}}  # int for double
    resp = await client.post(SCORE, json=body, headers={"X-Request-ID": "req-42"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["request_id"] == "req-42" and resp.headers["x-request-id"] == "req-42"
    assert out["feature_status"] == dict.fromkeys(VIEWS, "missing")
    assert out["feature_age_ms"] == dict.fromkeys(VIEWS, None)
    assert out["features"]["amount"] == 7.0 and isinstance(predlog.records[0]["features"]["amount"], float)
    assert out["features"]["txn_count_1h"] == 0 and out["features"]["amount_max_1h"] is None
    assert predlog.records[0]["event_id"] is None


async def test_score_batch(client: httpx.AsyncClient, store: FakeStore, predlog: FakeLog):
    instances = [instance(), instance("card-000002", amount=99.0), instance(card_present=False)]
    resp = await client.post(SCORE, json={"instances": instances}, headers={"X-Request-ID": "b"})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert [p["request_id"] for p in preds] == ["b-0", "b-1", "b-2"]
    assert [p["feature_status"]["card_activity"] for p in preds] == ["present", "missing", "present"]
    assert preds[1]["features"]["amount"] == 99.0 and preds[2]["features"]["card_present"] is False
    # one call, each (view, entity) once
    assert store.calls == [[(v, e) for e in (ENTITY, "card-000002") for v in VIEWS]] or sorted(
        store.calls[0]
    ) == sorted((v, e) for e in (ENTITY, "card-000002") for v in VIEWS)
    assert len(store.calls) == 1 and len(store.calls[0]) == 6
    assert [r["features"] for r in predlog.records] == [p["features"] for p in preds]
    assert [r["request_id"] for r in predlog.records] == ["b-0", "b-1", "b-2"]


async def test_list_models_health_ready_and_metrics(
    client: httpx.AsyncClient, project: Project, store: FakeStore
):
    # every model of the example is listed; only this one has a version
    models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
    assert set(models) == set(project.models)
    assert (models[MODEL]["champion"], models[MODEL]["traffic"]) == (1, {"1": 1.0})
    assert all(m["champion"] is None for name, m in models.items() if name != MODEL)
    [loaded] = models[MODEL]["versions"]
    assert (loaded["version"], loaded["flavor"], loaded["task"]) == (1, "river", "binary")
    assert loaded["loaded_at"] > 0
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    # ready: a model serves, and no other model has a version published that is not loaded
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["models"] == {name: 1 if name == MODEL else None for name in project.models}
    assert store.pings == 1
    await client.post(SCORE, json=instance())
    text = (await client.get("/metrics")).text
    assert 'tide_requests_total{route="score",status="200"}' in text
    assert "tide_request_latency_seconds_bucket" in text and "tide_model_version" in text


async def test_not_ready_without_model_or_redis(
    settings: ServeSettings, project: Project, inputs: ModelInputs, store: FakeStore
):
    app = create_app(
        settings, project=project, registry=ModelRegistry(known=[MODEL]), store=store, predlog=FakeLog()
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.get("/readyz")
        assert resp.status_code == 503 and "no version of any model" in resp.json()["reasons"][0]
        assert resp.json()["models"] == dict.fromkeys(project.models)

    async def broken_ping() -> bool:
        raise ConnectionError("refused")

    registry = ModelRegistry()
    registry.swap(load_model(model_record(1, new_learner(project)), inputs))
    store.ping = broken_ping  # type: ignore[method-assign]
    app = create_app(settings, project=project, registry=registry, store=store, predlog=FakeLog())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.get("/readyz")
        assert resp.status_code == 503 and "PING" in resp.json()["reasons"][0]


# --- client errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 422, None),
        ({"features": FEATURES}, 422, "entities"),
        ({"entity": "", "features": FEATURES}, 422, "entity"),
        ({"entity": 5, "features": FEATURES}, 422, "entity"),
        ({"entities": {}, "features": FEATURES}, 422, "entities.card_id"),
        ({"entities": {"card_id": "c", "user_id": "u"}, "features": FEATURES}, 422, "entities.user_id"),
        ({"entities": {"card_id": ""}, "features": FEATURES}, 422, "entities.card_id"),
        ({"entities": ["c"], "features": FEATURES}, 422, "entities"),
        ({"entity": "c", "entities": {"card_id": "c"}, "features": FEATURES}, 422, "entity"),
        ({"entity": "c", "event_id": 3, "features": FEATURES}, 422, "event_id"),
        ({"entity": "c"}, 422, "features"),
        ({"entity": "c", "features": [1]}, 422, "features"),
        (
            {"entity": "c", "features": {k: v for k, v in FEATURES.items() if k != "amount"}},
            422,
            "features.amount",
        ),
        (instance(amount="12.5"), 422, "features.amount"),
        (instance(amount=True), 422, "features.amount"),
        (instance(amount=None), 422, "features.amount"),
        (instance(category=5), 422, "features.category"),
        (instance(card_present=1), 422, "features.card_present"),
        (instance(card_present="true"), 422, "features.card_present"),
        (instance(txn_count_1h=3.0), 422, "features.txn_count_1h"),
        ({**instance(), "colour": "red"}, 422, "colour"),
        ({"instances": []}, 422, "instances"),
        ({"instances": {"a": 1}}, 422, "instances"),
        ({"instances": [instance()] * 257}, 413, None),  # over the 4 KiB test limit before the count
        ({"instances": [instance(), instance(amount=False)]}, 422, "instances[1].features.amount"),
        (
            {"instances": [instance(), {"entities": {}, "features": FEATURES}]},
            422,
            "instances[1].entities.card_id",
        ),
        ({"instances": [instance(), 7]}, 422, "instances[1]"),
        ({"instances": [instance()], "entity": "x"}, 422, "entity"),
    ],
)
async def test_client_errors(
    client: httpx.AsyncClient, predlog: FakeLog, store: FakeStore, body: Any, status: int, field: str | None
):
    resp = (
        await client.post(SCORE, content=body)
        if isinstance(body, bytes)
        else await client.post(SCORE, json=body)
    )
    assert resp.status_code == status, resp.text
    out = resp.json()
    assert out["error"]
    assert out.get("field") == field
    assert predlog.records == [] and store.calls == []


async def test_batch_limit(project: Project, registry: ModelRegistry, store: FakeStore):
    app = create_app(
        ServeSettings(serve_max_body_bytes=1 << 20),
        project=project,
        registry=registry,
        store=store,
        predlog=FakeLog(),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.post(SCORE, json={"instances": [instance()] * 257})
        assert resp.status_code == 422 and resp.json()["field"] == "instances"
        resp = await c.post(SCORE, json={"instances": [instance()] * 256})
        assert resp.status_code == 200 and len(resp.json()["predictions"]) == 256


async def test_oversize_body_by_header_and_by_actual_size(client: httpx.AsyncClient, settings: ServeSettings):
    big = b'{"entity": "' + b"x" * settings.serve_max_body_bytes + b'"}'
    resp = await client.post(SCORE, content=big)
    assert resp.status_code == 413 and "4096" in resp.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: only the actual size tells
        for _ in range(5):
            yield b" " * 1000

    resp = await client.post(SCORE, content=chunks())
    assert resp.status_code == 413


async def test_unknown_model_and_model_not_loaded(
    settings: ServeSettings, project: Project, store: FakeStore
):
    predlog = FakeLog()
    app = create_app(
        settings, project=project, registry=ModelRegistry(known=[MODEL]), store=store, predlog=predlog
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.post("/v1/models/nope/score", json=instance())
        assert resp.status_code == 404 and "nope" in resp.json()["error"]
        resp = await c.post("/v1/models/nope/deployments", json={"action": "follow"})
        assert resp.status_code == 404
        resp = await c.post(SCORE, json=instance())
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert "no version" in resp.json()["error"]
    assert predlog.records == []


async def test_feature_read_timeout_and_failure(project: Project, registry: ModelRegistry, predlog: FakeLog):
    store = FakeStore(delay=0.3)
    app = create_app(
        ServeSettings(serve_request_timeout_s=0.05),
        project=project,
        registry=registry,
        store=store,
        predlog=predlog,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.post(SCORE, json=instance())
        assert resp.status_code == 504 and "0.05" in resp.json()["error"]
        store.delay, store.fail = 0.0, ConnectionError("redis down")
        resp = await c.post(SCORE, json=instance())
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert predlog.records == []


# --- hot swap ----------------------------------------------------------------------------------------------


async def test_hot_swap_under_load(
    client: httpx.AsyncClient,
    project: Project,
    inputs: ModelInputs,
    registry: ModelRegistry,
    predlog: FakeLog,
):
    """200 swaps from another thread while 20 clients score: no errors, and every response comes whole
    from one loaded version (its score is that version's model's score)."""
    x = {**FEATURES, **SERVED}
    bases = [load_model(model_record(1, trained_model(project, seed)), inputs) for seed in range(4)]
    expected_by_base = [b.runtime.predict_one(x).score for b in bases]
    assert len(set(expected_by_base)) == 4
    versions = {v: dataclasses.replace(bases[v % 4], version=v) for v in range(2, 202)}
    expected = {1: registry.get(MODEL).runtime.predict_one(x).score}  # type: ignore[union-attr]
    expected.update({v: expected_by_base[v % 4] for v in versions})
    swapped = threading.Event()

    def swapper() -> None:
        for v in range(2, 202):
            assert registry.swap(versions[v])
            time.sleep(0.0005)
        swapped.set()

    async def worker() -> list[httpx.Response]:
        out = []
        while not swapped.is_set() or len(out) < 5:
            out.append(await client.post(SCORE, json=instance()))
        return out

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        results = await asyncio.gather(*(worker() for _ in range(20)))
    finally:
        thread.join()
    responses = [r for rs in results for r in rs]
    assert [r.status_code for r in responses if r.status_code != 200] == []
    seen = set()
    for r in responses:
        body = r.json()
        assert body["version"] in expected
        assert body["score"] == pytest.approx(expected[body["version"]])
        seen.add(body["version"])
    assert len(seen) > 5, seen  # the swaps really interleaved with the requests
    assert registry.get(MODEL).version == 201  # type: ignore[union-attr]
    assert all(r["score"] == pytest.approx(expected[r["version"]]) for r in predlog.records)


def test_registry_keeps_newest_and_waits(project: Project, inputs: ModelInputs):
    registry = ModelRegistry()
    v2 = load_model(model_record(2, new_learner(project)), inputs)
    assert registry.swap(v2)
    assert not registry.swap(dataclasses.replace(v2, version=1))
    assert registry.get(MODEL) is v2 and registry.is_known(MODEL) and not registry.is_known("x")
    threading.Timer(0.05, registry.swap, args=(dataclasses.replace(v2, version=3),)).start()
    assert registry.wait_for(MODEL, 3, timeout=5).version == 3
    with pytest.raises(ServingError, match="version 9"):
        registry.wait_for(MODEL, 9, timeout=0.05)


# --- loading and the follower ------------------------------------------------------------------------------


def test_load_model_checks_and_warms_up(project: Project, inputs: ModelInputs):
    loaded = load_model(model_record(3, trained_model(project, 2)), inputs)
    assert (loaded.name, loaded.version, loaded.flavor, loaded.task) == (MODEL, 3, "river", "binary")
    assert 0.0 <= loaded.runtime.predict_one({**FEATURES, **SERVED}).score <= 1.0
    with pytest.raises(ModelLoadError, match="digest"):
        load_model(model_record(4, new_learner(project), sha256="0" * 64), inputs)
    with pytest.raises(ModelLoadError, match="flavor 'nope'"):
        load_model(model_record(4, new_learner(project), flavor="nope"), inputs)
    garbage = b"not a pickle"
    with pytest.raises(ModelLoadError, match="unpickle"):
        load_model(
            model_record(4, None, artifact=garbage, sha256=hashlib.sha256(garbage).hexdigest()), inputs
        )
    with pytest.raises(ModelLoadError, match="needs predict_proba_one"):  # a regressor for a binary task
        load_model(model_record(4, linear_model.LinearRegression()), inputs)


def test_inputs_follow_the_definitions(inputs: ModelInputs):
    assert [(f.name, f.type) for f in inputs.request_fields] == [
        ("amount", "double"),
        ("category", "string"),
        ("country", "string"),
        ("card_present", "boolean"),
    ]
    assert inputs.join_keys == ("card_id",) and [v.name for v in inputs.views] == list(VIEWS)
    x = inputs.synthetic()
    assert x == {
        "amount": 0.0,
        "category": "",
        "country": "",
        "card_present": False,
        **{name: 0 if isinstance(value, int) else 0.0 for name, value in SERVED.items()},
    }
    assert list(x) == list(inputs.names) and isinstance(x["txn_count_lifetime"], int)


def encoded(record: dict[str, Any]) -> tuple[bytes, Source]:
    return codec.encode("model_version", record), Source("models", 0, record["version"])


def test_follower_bad_artifact_never_replaces_good(
    registry: ModelRegistry, settings: ServeSettings, project: Project
):
    letters = MemoryDeadLetters()
    loader = make_loader(model_inputs(project))
    follower = ModelFollower(settings, registry, loader=loader, models=[MODEL], dead_letters=letters)
    good = registry.get(MODEL)
    failures = metric("tide_model_load_failures_total", model=MODEL)
    invalid = metric("tide_model_records_invalid_total")
    fresh = new_learner(project)
    follower.apply([encoded(model_record(2, trained_model(project, 3), sha256="f" * 64))])
    assert registry.get(MODEL) is good
    assert metric("tide_model_load_failures_total", model=MODEL) == failures + 1
    [letter] = letters.letters  # the failure is published with the record and the reason
    assert (letter.stage, letter.key, letter.offset) == ("serving.load", MODEL.encode(), 2)
    assert "digest" in letter.error and codec.decode(letter.value or b"")["version"] == 2
    follower.apply(
        [
            (b"garbage", Source("models", 0, 7)),
            (codec.encode("drift_alert", _alert()), Source("models", 0, 8)),
        ]
    )
    assert registry.get(MODEL) is good and metric("tide_model_records_invalid_total") == invalid + 2
    # In one batch the newest loadable version wins; a broken newer one falls back to it.
    swaps = metric("tide_model_swaps_total", model=MODEL)
    follower.apply(
        [
            encoded(model_record(3, fresh)),
            encoded(model_record(4, fresh)),
            encoded(model_record(5, fresh, flavor="nope")),
        ]
    )
    assert registry.get(MODEL).version == 4  # type: ignore[union-attr]
    assert metric("tide_model_swaps_total", model=MODEL) == swaps + 1
    assert metric("tide_model_version", model=MODEL, arm="champion") == 4
    follower.apply([encoded(model_record(2, fresh))])  # older: ignored
    assert registry.get(MODEL).version == 4  # type: ignore[union-attr]
    # A trained-for-another-task version is refused like a bad artifact.
    follower.apply([encoded(model_record(6, fresh, task="regression"))])
    assert registry.get(MODEL).version == 4 and "regression task" in letters.letters[-1].error  # type: ignore[union-attr]
    # Records of models not in the definitions are skipped: never loaded, never dead letters.
    lettered = len(letters.letters)
    follower.apply([encoded(model_record(1, fresh, model="other"))])
    assert (
        registry.get("other") is None and not registry.is_known("other") and len(letters.letters) == lettered
    )
    # Without a models filter, the loader refuses them (the definitions name no such model).
    ModelFollower(settings, registry, loader=loader, dead_letters=letters).apply(
        [encoded(model_record(1, fresh, model="other"))]
    )
    assert registry.get("other") is None and "not a model of the definitions" in letters.letters[-1].error


def _alert() -> dict[str, Any]:
    return {
        "alert_id": "a",
        "model": MODEL,
        "version": 1,
        "feature": "amount",
        "statistic": "psi",
        "value": 1.0,
        "threshold": 0.2,
        "window_size": 10,
        "reference_size": 10,
        "trigger_event_id": None,
        "ts": 1,
    }


class FakeMessage:
    """A consumed record of the models topic (one partition)."""

    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._offset = value, offset

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "models"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class FakeConsumer:
    def __init__(self, payloads: list[bytes]) -> None:
        self.pending = [FakeMessage(p, i) for i, p in enumerate(payloads)]
        self.closed = False

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        out, self.pending = self.pending[:num_messages], self.pending[num_messages:]
        if not out:
            time.sleep(timeout)
        return out

    def close(self) -> None:
        self.closed = True


def test_follower_thread_replays_and_stops(settings: ServeSettings, project: Project):
    registry = ModelRegistry()
    fresh = new_learner(project)
    consumer = FakeConsumer([encoded(model_record(v, fresh))[0] for v in (1, 2)] + [b"junk"])
    follower = ModelFollower(
        settings,
        registry,
        loader=make_loader(model_inputs(project)),
        consumer_factory=lambda s: consumer,  # type: ignore[arg-type,return-value]
    )
    follower.start()
    try:
        assert registry.wait_for(MODEL, 2, timeout=5).version == 2
        assert follower.running
    finally:
        follower.stop()
    assert not follower.running and consumer.closed
    assert metric("tide_model_swap_delay_seconds_count") >= 1


# --- prediction log ----------------------------------------------------------------------------------------


class FakeProducer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queued: list[tuple[str, bytes, bytes]] = []
        self.polls = 0

    def produce(self, topic: str, value: bytes, key: bytes) -> None:
        if len(self.queued) >= self.capacity:
            raise BufferError("queue full")
        self.queued.append((topic, value, key))

    def __len__(self) -> int:
        return len(self.queued)

    def poll(self, timeout: float) -> int:
        self.polls += 1
        time.sleep(timeout / 10)
        return 0

    def flush(self, timeout: float) -> int:
        self.queued.clear()  # acknowledged
        return 0


def _prediction(i: int) -> dict[str, Any]:
    return {
        "request_id": f"r{i}",
        "event_id": None,
        "entities": {"card_id": "card-7"},
        "model": MODEL,
        "version": 1,
        "arm": "champion",
        "features": {**FEATURES, **SERVED},
        "score": 0.25,
        "label": None,
        "probabilities": None,
        "latency_ms": 1.5,
        "ts": 5,
    }


def test_prediction_log_never_blocks_and_drops_when_full():
    producer = FakeProducer(capacity=2)
    log = PredictionLog(ServeSettings(topic_prefix="p."), producer=producer)  # type: ignore[arg-type]
    log.start()
    dropped = metric("tide_prediction_log_dropped_total")
    delivered = metric("tide_prediction_log_delivered_total")
    started = time.perf_counter()
    for i in range(3):
        log.log(_prediction(i))
    assert time.perf_counter() - started < 0.5
    assert metric("tide_prediction_log_dropped_total") == dropped + 1
    topic, value, key = producer.queued[0]
    assert topic == "p.predictions" and key == b"card-7"
    assert codec.decode(value, "prediction") == _prediction(0)
    assert log.close(timeout=1) == 0
    assert metric("tide_prediction_log_delivered_total") == delivered + 2
    assert producer.polls >= 1


def test_settings_validation():
    assert ServeSettings().serve_workers == 1
    with pytest.raises(ConfigError, match="TIDE_SERVE_WORKERS"):
        load(ServeSettings, serve_workers=0)


def test_loaded_model_is_immutable(project: Project, inputs: ModelInputs):
    loaded = load_model(model_record(1, new_learner(project)), inputs)
    assert isinstance(loaded, LoadedModel)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.version = 2  # type: ignore[misc]
