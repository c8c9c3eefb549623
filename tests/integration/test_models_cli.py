"""`tide models list|show|history` against records published on the real broker."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from confluent_kafka import Producer

from infra.settings import CommonSettings, env_var
from infra.topics import topic
from schemas import codec
from tide import cli

pytestmark = pytest.mark.integration


def version(model: str, v: int, ts: int, blessed: bool | None = None) -> dict[str, Any]:
    return {
        "model": model,
        "version": v,
        "flavor": "river",
        "artifact": b"x",
        "sha256": "0" * 64,
        "feature_names": ["a"],
        "metric_name": "rocauc",
        "metric_value": 0.7,
        "trained_on": 10 * v,
        "created_ts": ts,
        "parent_version": v - 1 if v > 1 else None,
        "trigger": "schedule" if v < 3 else "concept drift alert a-1",
        "blessing": None
        if blessed is None
        else {
            "blessed": blessed,
            "reason": "ok" if blessed else "rocauc fell 0.08 > 0.02",
            "metric": "rocauc",
        },
    }


def deployment(model: str, action: str, v: int | None, ts: int, source: str, id_: str) -> dict[str, Any]:
    return {
        "model": model,
        "action": action,
        "version": v,
        "weight": 0.0,
        "reason": f"by {source}",
        "id": id_,
        "source": source,
        "ts": ts,
    }


def send(settings: CommonSettings, name: str, kind: str, records: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for record in records:
        producer.produce(
            topic(settings, name), key=record["model"].encode(), value=codec.encode(kind, record)
        )
    assert producer.flush(10) == 0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert cli.main(["models", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_models_list_show_and_history(
    settings: CommonSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("kafka_bootstrap", "topic_prefix"):
        monkeypatch.setenv(env_var(name), str(getattr(settings, name)))
    send(
        settings,
        "models",
        "model_version",
        [
            version("m", 1, 1_000),
            version("m", 2, 2_000, blessed=True),
            version("m", 3, 5_000, blessed=False),
            version("other", 1, 1_500),
            version("third", 1, 1_600),
        ],
    )
    send(
        settings,
        "deployments",
        "deployment",
        [
            deployment("m", "promote", 1, 3_000, "api", "d-1"),
            deployment("m", "promote", 99999, 4_000, "cli", "d-2"),  # never published: held
            deployment("m", "follow", None, 6_000, "judge", "d-3"),  # supersedes it
            # never published either: long past the time a node holds it (refused), and just now (held)
            deployment("other", "promote", 88, 6_500, "cli", "d-4"),
            deployment("third", "promote", 77, int(time.time() * 1000), "cli", "d-5"),
        ],
    )
    verdict = {
        "verdict_id": "v-1",
        "model": "m",
        "version": 2,
        "champion_version": 1,
        "arm": "canary",
        "outcome": "pass",
        "rule": "non_inferiority",
        "metric": "log_loss",
        "estimate": -0.01,
        "lower": -0.02,
        "upper": 0.005,
        "margin": 0.01,
        "alpha": 0.05,
        "n": 400,
        "duration_ms": 1000,
        "action": "promote",
        "final": True,
        "ts": 3_500,
    }
    send(settings, "canary-verdicts", "canary_verdict", [verdict])
    alert = {
        "alert_id": "a-1",
        "model": "m",
        "version": 2,
        "feature": "loss",
        "statistic": "adwin",
        "value": 0.4,
        "threshold": 0.002,
        "window_size": 800,
        "reference_size": 500,
        "kind": "concept",
        "delay_records": 120,
        "ts": 4_500,
    }
    send(settings, "drift-alerts", "drift_alert", [alert])

    listed = {m["name"]: m for m in run(capsys, "list")["models"]}
    assert set(listed) == {"m", "other", "third"}
    m = listed["m"]
    # follow after the promote: the newest BLESSED version (3 is not blessed)
    assert (m["champion"], m["newest"], m["newest_blessed"]) == (2, 3, 2)
    assert m["versions"]["3"] == {"blessed": False, "reason": "rocauc fell 0.08 > 0.02"}
    assert m["versions"]["1"]["blessed"] is True and m["pending_deployments"] == 0
    assert listed["other"]["champion"] == 1 and listed["other"]["pending_deployments"] == 0
    assert listed["third"]["champion"] == 1 and listed["third"]["pending_deployments"] == 1
    [refused] = [e for e in run(capsys, "history", "other")["events"] if e["event"] == "deployment"]
    assert refused["status"] == "refused" and "was not published within 60 s" in refused["status_reason"]

    shown = run(capsys, "show", "m")
    statuses = {v["version"]: v["status"] for v in shown["versions"]}
    assert statuses == {1: "previous", 2: "champion", 3: "unblessed"}
    two = shown["versions"][1]
    assert two["parent_version"] == 1 and two["trained_on"] == 20
    assert [v["verdict_id"] for v in two["verdicts"]] == ["v-1"]

    events = run(capsys, "history", "m")["events"]
    assert [(e["ts"], e["event"]) for e in events] == [
        (1_000, "version"),
        (2_000, "version"),
        (3_000, "deployment"),
        (3_500, "verdict"),
        (4_000, "deployment"),
        (4_500, "drift_alert"),
        (5_000, "version"),
        (6_000, "deployment"),
    ]
    by_id = {e["id"]: e for e in events if e["event"] == "deployment"}
    assert (by_id["d-1"]["source"], by_id["d-1"]["status"]) == ("api", "applied")
    assert (
        by_id["d-2"]["status"] == "refused"
        and "superseded by deployment d-3" in by_id["d-2"]["status_reason"]
    )
    assert events[6]["blessing_blessed"] is False and events[5]["delay_records"] == 120

    assert cli.main(["models", "show", "nobody"]) == 2
    assert "no records of model 'nobody'" in capsys.readouterr().err
