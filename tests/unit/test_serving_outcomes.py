"""Deployments that cannot silently stick: refused (409) or held pending for a version not read, outcomes
visible by id; unblessed versions never champion under follow; the versions view with verdicts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest

from infra.deadletter import MemoryDeadLetters
from infra.errors import DeploymentError
from models.runtime import LoadedModel
from schemas import codec
from schemas.definitions import Project
from serving.app import create_app
from serving.deployments import deployment_record
from serving.follower import ModelFollower
from serving.ledger import MAX_VERDICTS, DeploymentRefused, is_blessed
from serving.registry import ModelRegistry, Source
from serving.settings import ServeSettings
from tests.unit.test_deployments import AnyEntityStore, Log, version

MODEL = "fraud"


def model_record(v: int, blessed: bool | None = None, **extra: Any) -> dict[str, Any]:
    blessing = None
    if blessed is not None:
        blessing = {
            "blessed": blessed,
            "reason": "candidate auc 0.61 < baseline 0.70 - 0.01" if not blessed else "within thresholds",
            "metric": "auc",
            "candidate_value": 0.61,
            "baseline_value": 0.70,
            "baseline_version": v - 1,
            "window_labels": 500,
        }
    return {
        "model": MODEL,
        "version": v,
        "flavor": "river",
        "artifact": b"x",
        "artifact_uri": None,
        "sha256": "0" * 64,
        "feature_names": [],
        "metric_name": "auc",
        "metric_value": 0.7,
        "trained_on": 100 * v,
        "created_ts": 1_000 + v,
        "parent_version": v - 1 if v > 1 else None,
        "trigger": "schedule",
        "blessing": blessing,
        **extra,
    }


def verdict(v: int, outcome: str = "pass", n: int = 50) -> dict[str, Any]:
    return {
        "verdict_id": f"verdict-{v}-{n}",
        "model": MODEL,
        "version": v,
        "champion_version": v - 1,
        "arm": "canary",
        "outcome": outcome,
        "rule": "non_inferiority",
        "metric": "log_loss",
        "estimate": -0.01,
        "lower": -0.03,
        "upper": 0.01,
        "margin": 0.02,
        "alpha": 0.05,
        "n": n,
        "duration_ms": 1000,
        "ts": 5_000 + n,
    }


class Feed:
    """A follower fed by hand (as if read from the topics), loading every version it is asked to."""

    def __init__(self, pending_s: float = 60.0, fail: frozenset[int] = frozenset()) -> None:
        self.registry = ModelRegistry(pending_s=pending_s)
        self.fail = fail

        def loader(record: Mapping[str, Any]) -> LoadedModel:
            if record["version"] in self.fail:
                raise RuntimeError("broken artifact")
            return version(record["version"])

        self.follower = ModelFollower(
            ServeSettings(), self.registry, loader=loader, dead_letters=MemoryDeadLetters()
        )
        self.at = 0

    def __call__(self, *records: tuple[str, Mapping[str, Any]]) -> None:
        batch = []
        for kind, record in records:
            self.at += 1
            batch.append((codec.encode(kind, record), Source(kind, 0, self.at)))
        self.follower.apply(batch)

    def champion(self) -> int | None:
        model = self.registry.get(MODEL)
        return model.version if model is not None else None


def deployment(
    action: str, v: int | None = None, weight: float = 0.0, source: str = "judge"
) -> dict[str, Any]:
    return deployment_record(MODEL, action, v, weight, reason="test", source=source)


def test_blessing_null_counts_as_blessed():
    assert is_blessed(model_record(1)) and is_blessed(model_record(1, blessed=True))
    assert not is_blessed(model_record(1, blessed=False))


def test_an_unblessed_version_never_becomes_champion_under_follow():
    feed = Feed()
    feed(("model_version", model_record(1)), ("model_version", model_record(2, blessed=True)))
    assert feed.champion() == 2
    feed(("model_version", model_record(3, blessed=False)))
    assert feed.champion() == 2  # the newest BLESSED version
    [described] = feed.registry.describe()
    assert described["unblessed"] == {"3": "candidate auc 0.61 < baseline 0.70 - 0.01"}
    assert described["newest"] == 2
    # It may not be promoted nor canaried; shadowing it is how it is watched.
    for action, weight in (("promote", 0.0), ("canary", 0.2)):
        with pytest.raises(DeploymentRefused, match="not blessed"):
            feed.registry.preview(deployment(action, 3, weight))
    record = deployment("promote", 3)
    feed(("deployment", record))
    assert feed.registry.deployment(MODEL, record["id"])["status"] == "refused"  # type: ignore[index]
    feed(("deployment", deployment("shadow", 3)))
    routing = feed.registry.routing(MODEL)
    assert routing is not None and routing.champion.version == 2 and routing.shadow.version == 3  # type: ignore[union-attr]
    feed(("model_version", model_record(4, blessed=True)))
    assert feed.champion() == 4


def test_a_deployment_naming_an_unknown_version_is_held_then_applied_when_it_arrives():
    feed = Feed()
    feed(("model_version", model_record(1)), ("deployment", deployment("promote", 1)))
    record = deployment("canary", 2, 0.25)
    feed(("deployment", record))
    held = feed.registry.deployment(MODEL, record["id"])
    assert held is not None and held["status"] == "pending" and "not been published" in held["status_reason"]
    [described] = feed.registry.describe()
    assert [p["id"] for p in described["pending"]] == [record["id"]]
    routing = feed.registry.routing(MODEL)
    assert routing is not None and routing.canary is None
    feed(("model_version", model_record(2)))
    assert feed.registry.deployment(MODEL, record["id"])["status"] == "applied"  # type: ignore[index]
    routing = feed.registry.routing(MODEL)
    assert routing is not None and routing.champion.version == 1 and routing.canary.version == 2  # type: ignore[union-attr]


def test_a_held_deployment_is_refused_after_the_bound_and_never_pins_the_champion():
    feed = Feed(pending_s=5.0)
    feed(("model_version", model_record(1)))
    record = deployment("promote", 99999, source="cli")
    feed(("deployment", record))
    assert feed.champion() == 1
    feed.registry.expire(time.monotonic() + 1)
    assert feed.registry.deployment(MODEL, record["id"])["status"] == "pending"  # type: ignore[index]
    feed.registry.expire(time.monotonic() + 6)
    outcome = feed.registry.deployment(MODEL, record["id"])
    assert outcome is not None and outcome["status"] == "refused" and outcome["source"] == "cli"
    assert outcome["status_reason"] == "version 99999 was not published within 5 s"
    assert feed.registry.describe()[0]["pending"] == []
    feed(("model_version", model_record(2)))  # new versions keep serving
    assert feed.champion() == 2 and feed.registry.problems() == []


def test_a_later_deployment_supersedes_one_held_for_its_version():
    feed = Feed()
    feed(("model_version", model_record(1)), ("model_version", model_record(2)))
    held, later = deployment("promote", 7), deployment("follow")
    feed(("deployment", held), ("deployment", later))
    outcome = feed.registry.deployment(MODEL, held["id"])
    assert outcome is not None and outcome["status"] == "refused"
    assert outcome["status_reason"] == f"superseded by deployment {later['id']} (follow)"
    feed(("model_version", model_record(7)))
    assert feed.champion() == 7  # by follow, not by the superseded promote
    assert feed.registry.describe()[0]["policy"]["champion"] == "newest"


def test_a_promoted_version_that_fails_to_load_is_undone_and_refused():
    feed = Feed(fail=frozenset({3}))
    feed(("model_version", model_record(1)), ("model_version", model_record(2)))
    feed(("model_version", model_record(3)))  # fails to load: 2 keeps serving, follow goes on
    assert feed.champion() == 2
    with pytest.raises(DeploymentRefused, match="failed to load"):
        feed.registry.preview(deployment("promote", 3))
    feed.fail = frozenset({4})
    feed(("model_version", model_record(4, blessed=True)), ("deployment", record := deployment("promote", 4)))
    # 4 was the newest: following loaded and failed it before the promote was read, so it is refused...
    outcome = feed.registry.deployment(MODEL, record["id"])
    assert (
        outcome is not None
        and outcome["status"] == "refused"
        and "failed to load" in outcome["status_reason"]
    )
    assert feed.registry.describe()[0]["policy"]["champion"] == "newest" and feed.champion() == 2
    assert feed.registry.problems() == []


def test_a_promote_applied_before_its_load_fails_is_undone():
    registry = ModelRegistry()
    registry.remember(model_record(1))
    registry.swap(version(1))
    registry.remember(model_record(2))
    registry.swap(version(2))
    registry.deploy(record := deployment("promote", 1))
    registry.remember(model_record(5))
    registry.deploy(promote := deployment("promote", 5))
    assert registry.describe()[0]["policy"]["champion"] == 5 and registry.get(MODEL).version == 1  # type: ignore[union-attr]
    registry.failed(MODEL, 5, "DigestMismatch: bad bytes")
    assert registry.describe()[0]["policy"]["champion"] == 1  # back to what it was
    outcome = registry.deployment(MODEL, promote["id"])
    assert outcome is not None and outcome["status"] == "refused"
    assert "failed to load: DigestMismatch: bad bytes" in outcome["status_reason"]
    assert registry.deployment(MODEL, record["id"])["status"] == "applied"  # type: ignore[index]


def test_invalid_records_and_rollbacks_with_nothing_to_return_to_are_refused():
    registry = ModelRegistry()
    registry.remember(model_record(1))
    registry.swap(version(1))
    with pytest.raises(DeploymentRefused) as info:
        registry.preview(deployment("rollback"))
    assert info.value.body()["model"] == MODEL and "nothing to roll back to" in info.value.reason
    rollback = registry.deploy(deployment("rollback"))
    assert rollback["status"] == "refused" and "nothing to roll back to" in rollback["status_reason"]
    with pytest.raises(DeploymentError):
        registry.deploy({**deployment("follow"), "action": "retire"})
    statuses = [d["status"] for d in registry.deployments(MODEL) or []]
    assert statuses == ["refused", "refused"]  # newest first
    # A record older than ids is named by where it was read.
    old = {k: v for k, v in deployment("follow").items() if k not in ("id", "source")}
    assert registry.deploy(old, Source("deployments", 0, 41))["id"] == "deployments[0]@41"


def test_versions_list_lineage_status_and_bounded_verdicts():
    feed = Feed()
    feed(
        ("model_version", model_record(1)),
        ("model_version", model_record(2, blessed=True)),
        ("model_version", model_record(3, blessed=False)),
        ("model_version", model_record(4, blessed=True)),
    )
    feed(("deployment", deployment("promote", 2)), ("deployment", deployment("canary", 4, 0.1)))
    feed(*[("canary_verdict", verdict(4, n=n)) for n in range(MAX_VERDICTS + 5)])
    versions = {v["version"]: v for v in feed.registry.versions(MODEL) or []}
    assert {v: d["status"] for v, d in versions.items()} == {
        1: "previous",  # champion before 2, under follow
        2: "champion",
        3: "unblessed",
        4: "canary",
    }
    four = versions[4]
    assert four["parent_version"] == 3 and four["trigger"] == "schedule" and four["trained_on"] == 400
    assert four["blessing"]["blessed"] is True and four["metric_name"] == "auc"
    assert "artifact" not in four
    assert [v["n"] for v in four["verdicts"]] == list(range(5, MAX_VERDICTS + 5))  # the newest, bounded
    assert versions[3]["status_reason"].startswith("candidate auc")
    assert feed.registry.versions("nobody") is None


# --- over HTTP -------------------------------------------------------------------------------------------


@pytest.fixture
async def api(fraud_project: Project) -> AsyncIterator[tuple[httpx.AsyncClient, ModelRegistry]]:
    registry = ModelRegistry()
    for v in (1, 2):
        registry.remember(model_record(v))
        registry.swap(version(v))
    registry.remember(model_record(3, blessed=False))

    async def deployer(record: dict[str, Any]) -> None:
        codec.encode("deployment", record)
        registry.deploy(record)  # what every node does when it reads the record back

    app = create_app(
        ServeSettings(),
        project=fraud_project,
        registry=registry,
        store=AnyEntityStore(),
        predlog=Log(),
        deployer=deployer,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        yield c, registry


async def test_promoting_a_version_never_published_answers_409_naming_it(
    api: tuple[httpx.AsyncClient, ModelRegistry],
):
    client, registry = api
    url = f"/v1/models/{MODEL}/deployments"
    resp = await client.post(url, json={"action": "promote", "version": 99999})
    assert resp.status_code == 409
    body = resp.json()
    assert (body["model"], body["action"], body["version"]) == (MODEL, "promote", 99999)
    assert body["reason"] == f"version 99999 was never published for model {MODEL!r}"
    resp = await client.post(url, json={"action": "canary", "version": 3, "weight": 0.5})
    assert resp.status_code == 409 and "not blessed" in resp.json()["reason"]
    assert registry.deployments(MODEL) == []  # nothing published
    assert registry.get(MODEL).version == 2  # type: ignore[union-attr]
    ready = await client.get("/readyz")
    assert "champion pinned" not in ready.text


async def test_an_accepted_deployment_answers_its_id_and_location(
    api: tuple[httpx.AsyncClient, ModelRegistry],
):
    client, _ = api
    resp = await client.post(
        f"/v1/models/{MODEL}/deployments", json={"action": "promote", "version": 1, "reason": "r"}
    )
    assert resp.status_code == 202
    accepted = resp.json()
    record = accepted["deployment"]
    assert record["source"] == "api" and len(record["id"]) == 32
    assert resp.headers["location"] == f"/v1/models/{MODEL}/deployments/{record['id']}"
    assert accepted["outcome"]["status"] == "applied"
    got = await client.get(resp.headers["location"])
    assert got.status_code == 200 and got.json()["status"] == "applied" and got.json()["reason"] == "r"
    listed = await client.get(f"/v1/models/{MODEL}/deployments")
    assert [d["id"] for d in listed.json()["deployments"]] == [record["id"]]
    assert (await client.get(f"/v1/models/{MODEL}/deployments/nope")).status_code == 404
    assert (await client.get("/v1/models/nobody/deployments")).status_code == 404
    versions = (await client.get(f"/v1/models/{MODEL}/versions")).json()["versions"]
    assert [(v["version"], v["status"]) for v in versions] == [
        (1, "champion"),
        (2, "previous"),
        (3, "unblessed"),
    ]


async def test_a_deployment_that_cannot_be_published_is_refused_in_its_outcome(fraud_project: Project):
    registry = ModelRegistry()
    registry.remember(model_record(1))
    registry.swap(version(1))

    async def deployer(record: dict[str, Any]) -> None:
        from infra.errors import Unavailable

        raise Unavailable("broker away", retry_after=1)

    app = create_app(
        ServeSettings(),
        project=fraud_project,
        registry=registry,
        store=AnyEntityStore(),
        predlog=Log(),
        deployer=deployer,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as client:
        resp = await client.post(f"/v1/models/{MODEL}/deployments", json={"action": "follow"})
    assert resp.status_code == 503
    [outcome] = registry.deployments(MODEL) or []
    assert outcome["status"] == "refused" and outcome["status_reason"] == "not published: broker away"


def test_readiness_names_a_champion_pinned_to_a_version_that_cannot_serve():
    registry = ModelRegistry()
    registry.remember(model_record(1))
    registry.swap(version(1))
    registry.remember(model_record(2))
    registry.deploy(deployment("promote", 2))  # applied; loading
    assert registry.problems() == []
    registry.refuse(MODEL, 2, "view v9 retired")  # its lineage no longer fits (reconsidered later)
    assert registry.problems() == [
        f"model {MODEL!r}: champion pinned to version 2: version 2 cannot serve under these definitions: "
        "view v9 retired"
    ]
