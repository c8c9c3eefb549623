"""The scoring service with in-memory doubles: validation, scoring, logging, hot swaps and model loading."""

from __future__ import annotations

import asyncio
import dataclasses
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
from schemas.definitions import CARD_ACTIVITY, FeatureView
from features.store import FeatureRow
from infra.errors import ConfigError, ModelLoadError, ServingError
from infra.settings import load
from examples.fraud.model import FEATURE_NAMES, ONLINE_FEATURES, REQUEST_FIELDS, dump, new_model
from schemas import codec
from serving.app import create_app
from models.inputs import REQUEST_FIELD_TYPES, synthetic_input
from serving.predlog import PredictionLog
from serving.registry import ModelFollower, ModelRegistry, Source
from models.runtime import LoadedModel, load_model
from serving.settings import ServeSettings
from infra.deadletter import MemoryDeadLetters

MODEL = "fraud"
FEATURES = {"amount": 12.5, "category": "grocery", "country": "US", "card_present": True}
ONLINE = {
    "txn_count_1h": 3.0,
    "amount_sum_1h": 60.0,
    "amount_mean_1h": 20.0,
    "amount_max_1h": 30.0,
    "amount_std_1h": 8.0,
    "merchants_1h": 2.0,
}


# --- doubles and builders ----------------------------------------------------------------------------------


class FakeStore:
    """Online store double: fixed rows per entity, a record of every read, optional delay or failure."""

    def __init__(self, rows: Mapping[str, dict[str, float]] | None = None, delay: float = 0.0) -> None:
        self.rows = dict(rows or {})
        self.delay = delay
        self.fail: Exception | None = None
        self.reads: list[list[str]] = []
        self.pings = 0

    async def read(
        self, view: FeatureView, entities: Sequence[str], now_ms: int | None = None
    ) -> list[FeatureRow]:
        assert view is CARD_ACTIVITY
        self.reads.append(list(entities))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        out = []
        for entity in entities:
            values = self.rows.get(entity)
            if values is None:
                empty = tiles.window_values(CARD_ACTIVITY, {}, 0)
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


def trained_model(seed: int, steps: int = 50) -> Any:
    """A river model whose scores depend on ``seed``, so versions built from different seeds differ."""
    rng = random.Random(seed)
    model = new_model()
    for _ in range(steps):
        x = {**FEATURES, **ONLINE, "amount": rng.uniform(1, 500), "card_present": rng.random() < 0.5}
        model.learn_one(x, rng.random() < 0.3)
    return model


def model_record(version: int, learner: Any = None, **overrides: Any) -> dict[str, Any]:
    """A ModelVersion-shaped record around a river model (a fresh one by default)."""
    blob, digest = dump(learner if learner is not None else new_model())
    record = {
        "model": MODEL,
        "version": version,
        "flavor": "river",
        "artifact": blob,
        "artifact_uri": None,
        "sha256": digest,
        "feature_names": list(FEATURE_NAMES),
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


def instance(entity: str = "card-000001", **features: Any) -> dict[str, Any]:
    return {"entity": entity, "event_id": "ev-1", "features": {**FEATURES, **features}}


@pytest.fixture
def settings() -> ServeSettings:
    return ServeSettings(serve_request_timeout_s=0.5, serve_max_body_bytes=4096)


@pytest.fixture
def registry() -> ModelRegistry:
    reg = ModelRegistry(known=[MODEL])
    reg.swap(load_model(model_record(1, trained_model(1))))
    return reg


@pytest.fixture
def store() -> FakeStore:
    return FakeStore({"card-000001": ONLINE})


@pytest.fixture
def predlog() -> FakeLog:
    return FakeLog()


@pytest.fixture
async def client(
    settings: ServeSettings, registry: ModelRegistry, store: FakeStore, predlog: FakeLog
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, registry=registry, store=store, predlog=predlog)
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
    expected_x = {**FEATURES, **ONLINE}
    assert body["model"] == MODEL and body["version"] == 1 and body["arm"] == "champion"
    assert body["features"] == expected_x
    assert body["feature_status"] == "present" and body["feature_age_ms"] == 250
    model = registry.get(MODEL)
    assert model is not None
    assert body["score"] == pytest.approx(model.runtime.predict_one(expected_x))
    assert resp.headers["x-request-id"] == body["request_id"] and len(body["request_id"]) == 32
    assert (await client.post(SCORE, json=instance())).json()["request_id"] != body["request_id"]
    assert store.reads == [["card-000001"]] * 2
    logged = predlog.records[0]
    assert logged["request_id"] == body["request_id"]
    assert logged["event_id"] == "ev-1" and logged["entity"] == "card-000001"
    assert logged["features"] == expected_x and logged["score"] == body["score"]
    assert logged["version"] == 1 and logged["arm"] == "champion" and logged["latency_ms"] > 0
    # What is logged is a valid Prediction record, and survives the codec unchanged.
    assert codec.decode(codec.encode("prediction", logged), "prediction") == logged


async def test_score_uses_given_request_id_and_missing_features(client: httpx.AsyncClient, predlog: FakeLog):
    body = {"entity": "card-unknown", "features": {**FEATURES, "amount": 7}}  # int accepted for double
    resp = await client.post(SCORE, json=body, headers={"X-Request-ID": "req-42"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["request_id"] == "req-42" and resp.headers["x-request-id"] == "req-42"
    assert out["feature_status"] == "missing" and out["feature_age_ms"] is None
    assert out["features"]["amount"] == 7.0 and isinstance(predlog.records[0]["features"]["amount"], float)
    assert out["features"]["txn_count_1h"] == 0.0
    assert predlog.records[0]["event_id"] is None


async def test_score_batch(client: httpx.AsyncClient, store: FakeStore, predlog: FakeLog):
    instances = [instance(), instance("card-000002", amount=99.0), instance(card_present=False)]
    resp = await client.post(SCORE, json={"instances": instances}, headers={"X-Request-ID": "b"})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert [p["request_id"] for p in preds] == ["b-0", "b-1", "b-2"]
    assert [p["feature_status"] for p in preds] == ["present", "missing", "present"]
    assert preds[1]["features"]["amount"] == 99.0 and preds[2]["features"]["card_present"] is False
    assert store.reads == [["card-000001", "card-000002"]]  # one read, each entity once
    assert [r["features"] for r in predlog.records] == [p["features"] for p in preds]
    assert [r["request_id"] for r in predlog.records] == ["b-0", "b-1", "b-2"]


async def test_list_models_health_ready_and_metrics(client: httpx.AsyncClient, store: FakeStore):
    models = (await client.get("/v1/models")).json()["models"]
    assert [(m["name"], m["champion"], m["traffic"]) for m in models] == [(MODEL, 1, {"1": 1.0})]
    [loaded] = models[0]["versions"]
    assert (loaded["version"], loaded["flavor"]) == (1, "river")
    assert loaded["feature_names"] == list(FEATURE_NAMES) and loaded["loaded_at"] > 0
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["version"] == 1 and store.pings == 1
    await client.post(SCORE, json=instance())
    text = (await client.get("/metrics")).text
    assert 'tide_requests_total{route="score",status="200"}' in text
    assert "tide_request_latency_seconds_bucket" in text and "tide_model_version" in text


async def test_not_ready_without_model_or_redis(settings: ServeSettings, store: FakeStore):
    app = create_app(settings, registry=ModelRegistry(known=[MODEL]), store=store, predlog=FakeLog())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.get("/readyz")
        assert resp.status_code == 503 and "no version of model 'fraud'" in resp.json()["reasons"][0]

    async def broken_ping() -> bool:
        raise ConnectionError("refused")

    registry = ModelRegistry()
    registry.swap(load_model(model_record(1)))
    store.ping = broken_ping  # type: ignore[method-assign]
    app = create_app(settings, registry=registry, store=store, predlog=FakeLog())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.get("/readyz")
        assert resp.status_code == 503 and "PING" in resp.json()["reasons"][0]


# --- client errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 422, None),
        ({"features": FEATURES}, 422, "entity"),
        ({"entity": "", "features": FEATURES}, 422, "entity"),
        ({"entity": 5, "features": FEATURES}, 422, "entity"),
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
    assert predlog.records == [] and store.reads == []


async def test_batch_limit(registry: ModelRegistry, store: FakeStore):
    app = create_app(
        ServeSettings(serve_max_body_bytes=1 << 20), registry=registry, store=store, predlog=FakeLog()
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


async def test_unknown_model_and_model_not_loaded(settings: ServeSettings, store: FakeStore):
    predlog = FakeLog()
    app = create_app(settings, registry=ModelRegistry(known=[MODEL]), store=store, predlog=predlog)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.post("/v1/models/nope/score", json=instance())
        assert resp.status_code == 404 and "nope" in resp.json()["error"]
        resp = await c.post(SCORE, json=instance())
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert "no version" in resp.json()["error"]
    assert predlog.records == []


async def test_feature_read_timeout_and_failure(registry: ModelRegistry, predlog: FakeLog):
    store = FakeStore(delay=0.3)
    app = create_app(
        ServeSettings(serve_request_timeout_s=0.05), registry=registry, store=store, predlog=predlog
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.post(SCORE, json=instance())
        assert resp.status_code == 504 and "0.05" in resp.json()["error"]
        store.delay, store.fail = 0.0, ConnectionError("redis down")
        resp = await c.post(SCORE, json=instance())
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert predlog.records == []


# --- hot swap ----------------------------------------------------------------------------------------------


async def test_hot_swap_under_load(client: httpx.AsyncClient, registry: ModelRegistry, predlog: FakeLog):
    """200 swaps from another thread while 20 clients score: no errors, and every response comes whole
    from one loaded version (its score is that version's model's score)."""
    x = {**FEATURES, **ONLINE}
    bases = [load_model(model_record(1, trained_model(seed))) for seed in range(4)]
    expected_by_base = [b.runtime.predict_one(x) for b in bases]
    assert len(set(expected_by_base)) == 4
    versions = {v: dataclasses.replace(bases[v % 4], version=v) for v in range(2, 202)}
    expected = {1: registry.get(MODEL).runtime.predict_one(x)}  # type: ignore[union-attr]
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


def test_registry_keeps_newest_and_waits():
    registry = ModelRegistry()
    v2 = load_model(model_record(2))
    assert registry.swap(v2)
    assert not registry.swap(dataclasses.replace(v2, version=1))
    assert registry.get(MODEL) is v2 and registry.is_known(MODEL) and not registry.is_known("x")
    threading.Timer(0.05, registry.swap, args=(dataclasses.replace(v2, version=3),)).start()
    assert registry.wait_for(MODEL, 3, timeout=5).version == 3
    with pytest.raises(ServingError, match="version 9"):
        registry.wait_for(MODEL, 9, timeout=0.05)


# --- loading and the follower ------------------------------------------------------------------------------


def test_load_model_checks_and_warms_up():
    loaded = load_model(model_record(3, trained_model(2)))
    assert (loaded.name, loaded.version, loaded.flavor) == (MODEL, 3, "river")
    assert loaded.feature_names == FEATURE_NAMES
    assert 0.0 <= loaded.runtime.predict_one({**FEATURES, **ONLINE}) <= 1.0
    with pytest.raises(ModelLoadError, match="digest"):
        load_model(model_record(4, sha256="0" * 64))
    with pytest.raises(ModelLoadError, match="flavor 'nope'"):
        load_model(model_record(4, flavor="nope"))
    garbage = b"not a pickle"
    import hashlib

    with pytest.raises(ModelLoadError, match="unpickle"):
        load_model(model_record(4, artifact=garbage, sha256=hashlib.sha256(garbage).hexdigest()))
    with pytest.raises(ModelLoadError, match="warm-up"):  # a regressor has no predict_proba_one
        load_model(model_record(4, linear_model.LinearRegression()))


def test_synthetic_input_follows_event_schema():
    assert REQUEST_FIELD_TYPES == {
        "amount": "double",
        "category": "string",
        "country": "string",
        "card_present": "boolean",
    }
    x = synthetic_input(FEATURE_NAMES)
    assert x == {
        "amount": 0.0,
        "category": "",
        "country": "",
        "card_present": False,
        **dict.fromkeys(ONLINE_FEATURES, 0.0),
    }
    assert list(x)[: len(REQUEST_FIELDS)] == list(REQUEST_FIELDS)


def encoded(record: dict[str, Any]) -> tuple[bytes, Source]:
    return codec.encode("model_version", record), Source("models", 0, record["version"])


def test_follower_bad_artifact_never_replaces_good(registry: ModelRegistry, settings: ServeSettings):
    letters = MemoryDeadLetters()
    follower = ModelFollower(settings, registry, dead_letters=letters)
    good = registry.get(MODEL)
    failures = metric("tide_model_load_failures_total", model=MODEL)
    invalid = metric("tide_model_records_invalid_total")
    follower.apply([encoded(model_record(2, trained_model(3), sha256="f" * 64))])
    assert registry.get(MODEL) is good
    assert metric("tide_model_load_failures_total", model=MODEL) == failures + 1
    [letter] = letters.letters  # the failure is published with the record and the reason
    assert (letter.stage, letter.key, letter.offset) == ("serving.load", MODEL.encode(), 2)
    assert "digest" in letter.error and codec.decode(letter.value or b"")["version"] == 2
    follower.apply(
        [(b"garbage", Source("models", 0, 7)), (codec.encode("label", _label()), Source("models", 0, 8))]
    )
    assert registry.get(MODEL) is good and metric("tide_model_records_invalid_total") == invalid + 2
    # In one batch the newest loadable version wins; a broken newer one falls back to it.
    swaps = metric("tide_model_swaps_total", model=MODEL)
    follower.apply(
        [encoded(model_record(3)), encoded(model_record(4)), encoded(model_record(5, flavor="nope"))]
    )
    assert registry.get(MODEL).version == 4  # type: ignore[union-attr]
    assert metric("tide_model_swaps_total", model=MODEL) == swaps + 1
    assert metric("tide_model_version", model=MODEL, arm="champion") == 4
    follower.apply([encoded(model_record(2))])  # older: ignored
    assert registry.get(MODEL).version == 4  # type: ignore[union-attr]
    follower.apply([encoded(model_record(1, model="other"))])
    assert registry.get("other").version == 1  # type: ignore[union-attr]


def _label() -> dict[str, Any]:
    return {"event_id": "e", "card_id": "c", "is_fraud": False, "event_ts": 1, "ts": 2}


class _Msg:
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
        self.pending = [_Msg(p, i) for i, p in enumerate(payloads)]
        self.closed = False

    def consume(self, num_messages: int, timeout: float) -> list[_Msg]:
        out, self.pending = self.pending[:num_messages], self.pending[num_messages:]
        if not out:
            time.sleep(timeout)
        return out

    def close(self) -> None:
        self.closed = True


def test_follower_thread_replays_and_stops(settings: ServeSettings):
    registry = ModelRegistry()
    consumer = FakeConsumer([encoded(model_record(v))[0] for v in (1, 2)] + [b"junk"])
    follower = ModelFollower(settings, registry, consumer_factory=lambda s: consumer)  # type: ignore[arg-type,return-value]
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
        "entity": "card-7",
        "model": MODEL,
        "version": 1,
        "arm": "champion",
        "features": {**FEATURES, **ONLINE},
        "score": 0.25,
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


def test_loaded_model_is_immutable():
    loaded = load_model(model_record(1))
    assert isinstance(loaded, LoadedModel)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.version = 2  # type: ignore[misc]
