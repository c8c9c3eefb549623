"""Traffic policy: promote, canary (sticky, split by weight), shadow, rollback and follow; through the
registry, the follower and the HTTP app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from features import tiles
from features.store import FeatureRow
from infra.deadletter import MemoryDeadLetters
from infra.errors import DeploymentError
from models.base import Output
from models.runtime import LoadedModel
from schemas import codec
from schemas.definitions import FeatureView, Project
from serving.app import create_app
from serving.deployments import TrafficPolicy, bucket, deployment_record
from serving.follower import ModelFollower
from serving.registry import ModelRegistry, Source
from serving.settings import ServeSettings
from tests.unit.test_serving import FakeMessage

MODEL = "fraud"
SCORE = f"/v1/models/{MODEL}/score"
FEATURES = {"amount": 12.5, "category": "grocery", "country": "US", "card_present": True}


class ConstantRuntime:
    """Scores every input with one number, so a response's score says which version answered."""

    provider = "python"
    task = "binary"

    def __init__(self, score: float, fail: bool = False) -> None:
        self.score, self.fail, self.calls = score, fail, 0

    def predict_one(self, x: Mapping[str, Any]) -> Output:
        self.calls += 1
        if self.fail:
            raise RuntimeError("shadow model broke")
        return Output(self.score)

    def predict_many(self, xs: Sequence[Mapping[str, Any]]) -> list[Output]:
        return [self.predict_one(x) for x in xs]


def version(v: int, fail: bool = False) -> LoadedModel:
    return LoadedModel(MODEL, v, "river", ConstantRuntime(v / 100, fail), (), time.time(), 0)


def deploy(action: str, v: int | None = None, weight: float = 0.0) -> dict[str, Any]:
    return deployment_record(MODEL, action, v, weight, reason="test")


class AnyEntityStore:
    """Online store double: every entity is missing (scoring still works on defaults)."""

    async def read_pairs(self, pairs: Sequence[tuple[FeatureView, str]]) -> list[FeatureRow]:
        return [
            FeatureRow(e, v.name, tiles.window_values(v, {}, 0), "missing", None, None, v.describe())
            for v, e in pairs
        ]


class Log:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))


@pytest.fixture
def registry() -> ModelRegistry:
    reg = ModelRegistry(known=[MODEL])
    for v in (1, 2, 3):
        reg.swap(version(v))
    return reg


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
async def client(
    registry: ModelRegistry, log: Log, fraud_project: Project
) -> AsyncIterator[httpx.AsyncClient]:
    async def deployer(record: dict[str, Any]) -> None:
        registry.deploy(record)  # what every node does when it reads the record back from the topic

    app = create_app(
        ServeSettings(),
        project=fraud_project,
        registry=registry,
        store=AnyEntityStore(),
        predlog=log,
        deployer=deployer,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        yield c


def instance(entity: str) -> dict[str, Any]:
    return {"entity": entity, "features": FEATURES}


# --- the policy ----------------------------------------------------------------------------------------


def test_policy_actions():
    p = TrafficPolicy()
    assert p.wanted(newest=7) == [7]
    p = p.apply(deploy("promote", 3), serving=7)
    assert (p.champion, p.previous) == (3, (7,))
    p = p.apply(deploy("canary", 5, 0.25), serving=3)
    p = p.apply(deploy("shadow", 6), serving=3)
    assert p.wanted(newest=9) == [3, 5, 6, 7]  # champion, canary, shadow, the champion a rollback returns to
    promoted = p.apply(deploy("promote", 5), serving=3)
    assert (promoted.champion, promoted.canary, promoted.canary_weight, promoted.previous) == (
        5,
        None,
        0.0,
        (7, 3),
    )
    back = promoted.apply(deploy("rollback"), serving=5)
    assert (back.champion, back.previous, back.canary, back.shadow) == (3, (7,), None, 6)
    assert back.apply(deploy("rollback", 2), serving=3).champion == 2
    assert p.apply(deploy("canary", 5, 0.0), serving=3).canary is None
    assert p.apply(deploy("shadow"), serving=3).shadow is None
    assert p.apply(deploy("follow"), serving=3).champion is None
    with pytest.raises(DeploymentError, match="nothing to roll back"):
        TrafficPolicy().apply(deploy("rollback"), serving=1)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"action": "retire"}, "action"),
        ({"action": "promote"}, "version"),
        ({"action": "promote", "version": 0}, "version"),
        ({"action": "promote", "version": True}, "version"),
        ({"action": "canary", "version": 2, "weight": 1.5}, "weight"),
        ({"action": "canary", "version": 2, "weight": float("nan")}, "weight"),
        ({"action": "canary", "weight": 0.5}, "version"),
        ({"action": "shadow", "version": 2, "weight": 0.5}, "weight"),
        ({"action": "follow", "version": 2}, "version"),
    ],
)
def test_invalid_deployments_name_the_field(record: dict[str, Any], field: str):
    with pytest.raises(DeploymentError) as info:
        deployment_record(MODEL, record["action"], record.get("version"), record.get("weight", 0.0))
    assert info.value.field == field


def test_bucket_is_stable_and_uniform():
    assert bucket(MODEL, "card-1") == bucket(MODEL, "card-1") != bucket("other", "card-1")
    share = sum(bucket(MODEL, f"card-{i}") < 0.3 for i in range(20_000)) / 20_000
    assert share == pytest.approx(0.3, abs=0.015)


# --- the registry ----------------------------------------------------------------------------------------


def test_registry_routes_by_policy_and_rolls_back_instantly(registry: ModelRegistry):
    assert registry.get(MODEL).version == 3  # type: ignore[union-attr]  # following the newest
    registry.deploy(deploy("promote", 2))
    routing = registry.routing(MODEL)
    assert routing is not None and routing.champion.version == 2
    registry.swap(version(4))  # a newer version no longer becomes champion: 2 is pinned
    assert registry.get(MODEL).version == 2  # type: ignore[union-attr]
    registry.deploy(deploy("canary", 4, 0.5))
    registry.deploy(deploy("shadow", 4))
    routing = registry.routing(MODEL)
    assert routing is not None and (routing.canary, routing.shadow) == (routing.shadow, routing.canary)
    assert routing.describe() == {"champion": 2, "canary": 4, "shadow": 4, "traffic": {"2": 0.5, "4": 0.5}}
    # Rollback needs no load: the champion it returns to stayed loaded.
    registry.deploy(deploy("rollback"))
    routing = registry.routing(MODEL)
    assert routing is not None and (routing.champion.version, routing.canary) == (3, None)
    registry.deploy(deploy("follow"))
    assert registry.get(MODEL).version == 4  # type: ignore[union-attr]
    [described] = registry.describe()
    assert described["policy"]["champion"] == "newest" and described["shadow"] == 4


def _model_record(v: int, **overrides: Any) -> bytes:
    record = {
        "model": MODEL,
        "version": v,
        "flavor": "river",
        "artifact": b"x",
        "artifact_uri": None,
        "sha256": "0" * 64,
        "feature_names": [],
        "metric_name": "",
        "trained_on": 0,
        "created_ts": int(time.time() * 1000),
        **overrides,
    }
    return codec.encode("model_version", record)


def test_follower_loads_what_the_policy_wants(registry: ModelRegistry):
    loads: list[int] = []

    def loader(record: Mapping[str, Any]) -> LoadedModel:
        loads.append(record["version"])
        if record["version"] == 9:
            raise RuntimeError("broken artifact")
        return version(record["version"])

    letters = MemoryDeadLetters()
    follower = ModelFollower(ServeSettings(), ModelRegistry(), loader=loader, dead_letters=letters)
    at = iter(range(1000))

    def batch(*payloads: bytes) -> None:
        follower.apply((p, Source("t", 0, next(at))) for p in payloads)

    # A replay of 20 versions loads the newest and the one before (a rollback's target), not all 20;
    # a canary waiting for its version loads it on arrival.
    batch(*[_model_record(v) for v in range(1, 21)])
    assert loads == [20, 19]
    batch(
        codec.encode("deployment", deploy("promote", 5)),
        codec.encode("deployment", deploy("canary", 22, 0.1)),
    )
    assert loads == [20, 19, 5] and follower.registry.get(MODEL).version == 5  # type: ignore[union-attr]
    batch(_model_record(21), _model_record(22))
    routing = follower.registry.routing(MODEL)
    assert loads == [20, 19, 5, 22] and routing is not None and routing.canary.version == 22  # type: ignore[union-attr]
    # A broken canary is refused, published as a dead letter, and the routing keeps serving.
    batch(_model_record(9), codec.encode("deployment", deploy("canary", 9, 0.5)))
    routing = follower.registry.routing(MODEL)
    assert routing is not None and routing.champion.version == 5 and routing.canary is None
    assert [letter.stage for letter in letters.letters] == ["serving.load"]
    # An invalid deployment record (a bad action, written by something else) is refused, not applied.
    bad = codec.encode("deployment", {**deploy("follow"), "action": "retire"})
    batch(bad)
    assert follower.registry.get(MODEL).version == 5  # type: ignore[union-attr]


class TopicReader:
    """A consumer double over a shared list of payloads (one partition): each reader starts at the
    beginning, as the follower's does."""

    Message = FakeMessage

    def __init__(self, log: list[bytes]) -> None:
        self.log, self.at = log, 0

    def consume(self, n: int, timeout: float) -> list[TopicReader.Message]:
        out = [self.Message(p, i) for i, p in enumerate(self.log[self.at : self.at + n], start=self.at)]
        self.at += len(out)
        if not out:
            time.sleep(0.01)
        return out

    def close(self) -> None:
        pass


def test_a_model_added_while_following_is_replayed_and_each_record_applied_once():
    loads: list[tuple[str, int]] = []

    def loader(record: Mapping[str, Any]) -> LoadedModel:
        loads.append((record["model"], record["version"]))
        return LoadedModel(
            record["model"], record["version"], "river", ConstantRuntime(0.5), (), time.time(), 0
        )

    def promotions() -> float:
        labels = {"model": MODEL, "action": "promote"}
        return REGISTRY.get_sample_value("tide_deployments_applied_total", labels) or 0.0

    log = [
        _model_record(1),
        _model_record(1, model="other"),
        _model_record(2),
        codec.encode("deployment", deploy("promote", 1)),
    ]
    registry = ModelRegistry()
    follower = ModelFollower(
        ServeSettings(),
        registry,
        loader=loader,
        models=[MODEL],
        consumer_factory=lambda _: TopicReader(log),  # type: ignore[arg-type, return-value]
        dead_letters=MemoryDeadLetters(),
    )
    promoted = promotions()
    follower.start()
    try:
        registry.wait_until(MODEL, lambda r: r.champion.version == 1 and promotions() == promoted + 1)
        assert registry.routing("other") is None  # not a model followed: skipped
        follower.follow([MODEL, "other"])  # added: its records, read before, are replayed from the start
        registry.wait_for("other", 1)
        time.sleep(0.1)
        assert len(loads) == len(set(loads))  # nothing loaded twice
        assert promotions() == promoted + 1  # the replay applied no record of the model followed twice
        assert registry.get(MODEL).version == 1  # type: ignore[union-attr]
    finally:
        follower.stop()


# --- over HTTP -------------------------------------------------------------------------------------------


async def test_canary_split_is_within_two_points_and_sticky(client: httpx.AsyncClient, log: Log):
    resp = await client.post(
        f"/v1/models/{MODEL}/deployments", json={"action": "canary", "version": 2, "weight": 0.2}
    )
    assert resp.status_code == 202 and resp.json()["deployment"]["weight"] == 0.2
    arms: dict[str, str] = {}
    for start in range(0, 10_000, 250):
        batch = {"instances": [instance(f"card-{i}") for i in range(start, start + 250)]}
        resp = await client.post(SCORE, json=batch)
        assert resp.status_code == 200
        for offset, item in enumerate(resp.json()["predictions"]):
            assert (item["arm"], item["score"]) in {("champion", 0.03), ("canary", 0.02)}
            assert item["version"] == {"champion": 3, "canary": 2}[item["arm"]]
            arms[f"card-{start + offset}"] = item["arm"]
    share = sum(arm == "canary" for arm in arms.values()) / len(arms)
    assert len(arms) == 10_000 and share == pytest.approx(0.2, abs=0.02)
    logged = [(r["entities"]["card_id"], r["arm"]) for r in log.records]
    assert logged == list(arms.items())  # logged as answered
    # Sticky: an entity gets the same arm every time.
    for entity in list(arms)[:20]:
        assert (await client.post(SCORE, json=instance(entity))).json()["arm"] == arms[entity]


async def test_shadow_never_changes_a_response(client: httpx.AsyncClient, registry: ModelRegistry, log: Log):
    entities = [f"card-{i}" for i in range(50)]
    before = [(await client.post(SCORE, json=instance(e))).json() for e in entities]
    registry.swap(version(7, fail=True))  # newest: it would become champion if we followed
    registry.deploy(deploy("promote", 3))
    registry.deploy(deploy("shadow", 7))
    log.records.clear()
    after = [(await client.post(SCORE, json=instance(e))).json() for e in entities]
    strip = ("request_id",)
    assert [{k: v for k, v in b.items() if k not in strip} for b in before] == [
        {k: v for k, v in a.items() if k not in strip} for a in after
    ]
    assert {a["version"] for a in after} == {3}
    # The shadow's failures stay out of responses; a working shadow is logged as the shadow arm.
    registry.swap(version(8))
    registry.deploy(deploy("shadow", 8))
    log.records.clear()
    resp = (await client.post(SCORE, json=instance("card-1"))).json()
    await asyncio.sleep(0)
    assert resp["version"] == 3 and resp["arm"] == "champion"
    assert sorted((r["arm"], r["version"], r["score"]) for r in log.records) == [
        ("champion", 3, 0.03),
        ("shadow", 8, 0.08),
    ]
    assert {r["request_id"] for r in log.records} == {resp["request_id"]}


async def test_deployments_endpoint_errors(client: httpx.AsyncClient, registry: ModelRegistry):
    url = f"/v1/models/{MODEL}/deployments"
    resp = await client.post(url, json={"action": "promote"})
    assert resp.status_code == 422 and resp.json()["field"] == "version"
    resp = await client.post(url, json={"action": "promote", "version": 2, "color": "red"})
    assert resp.status_code == 422 and resp.json()["field"] == "color"
    resp = await client.post(url, json={"version": 2})
    assert resp.status_code == 422 and resp.json()["field"] == "action"
    resp = await client.post(url, content=b"{nope")
    assert resp.status_code == 400
    resp = await client.post("/v1/models/nobody/deployments", json={"action": "follow"})
    assert resp.status_code == 404
    resp = await client.post(url, json={"action": "rollback"})  # following the newest, 2 was before 3
    assert resp.status_code == 202
    assert (await client.post(SCORE, json=instance("card-1"))).json()["version"] == 2
    assert (await client.post(url, json={"action": "rollback"})).status_code == 202  # and 1 before 2
    resp = await client.post(url, json={"action": "rollback"})
    assert resp.status_code == 409 and resp.json()["field"] == "version"  # nothing before 1
    # 1 was no longer loaded (only the last champion stays loaded): 2 answers until 1 is back.
    assert registry.describe()[0]["policy"]["champion"] == 1
    assert (await client.post(SCORE, json=instance("card-1"))).json()["version"] == 2
    registry.swap(version(1))
    assert (await client.post(SCORE, json=instance("card-1"))).json()["version"] == 1


# --- the command -----------------------------------------------------------------------------------------


def test_deploy_command_names_the_model_when_the_project_has_several(
    fraud_project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    import dataclasses

    from schemas import registry as definitions
    from serving import deployments
    from tide import cli

    fraud = fraud_project.models[MODEL]
    views = list(fraud_project.views.values())
    one = Project.of("one", [fraud, *views])
    two = Project.of("two", [fraud, dataclasses.replace(fraud, name="fraud_b"), *views])
    applied = {"project": one}
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(
        definitions, "load", lambda settings: definitions.Registered(1, "d", applied["project"], "me", 0)
    )
    monkeypatch.setattr(deployments, "publish_deployment", lambda settings, record: published.append(record))
    assert cli.main(["deploy", "promote", "3"]) == 0  # one model: --model may be left out
    applied["project"] = two
    assert cli.main(["deploy", "promote", "3"]) == 2
    assert "--model is required: the project has models fraud, fraud_b" in capsys.readouterr().err
    assert cli.main(["deploy", "promote", "3", "--model", "nope"]) == 2
    assert "'nope' is not a model of the project" in capsys.readouterr().err
    assert cli.main(["deploy", "canary", "4", "--weight", "0.1", "--model", "fraud_b"]) == 0
    assert [(r["model"], r["action"], r["version"]) for r in published] == [
        (MODEL, "promote", 3),
        ("fraud_b", "canary", 4),
    ]
