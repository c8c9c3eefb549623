"""The `tide` command line as a user runs it: its own embedded stack, produce, tail, features, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fastavro
import pytest

from infra.settings import CommonSettings

pytestmark = pytest.mark.integration


def tide(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tide.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def lines(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_up_produce_tail_features_down(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    env["TIDE_STATE_DIR"] = str(tmp_path / "state")
    up = lines(tide("up", env=env))[0]
    try:
        status = lines(tide("status", env=env))[0]
        assert status["running"] and status["broker"]["answering"] and status["redis"]["answering"]
        # addresses come from the running stack: no TIDE_KAFKA_BOOTSTRAP needed
        produced = lines(tide("produce", "--count", "300", "--label-delay", "50", env=env))[0]
        assert (produced["events"], produced["labels"]) == (300, 300)
        events = lines(tide("tail", "events", env=env))
        assert len(events) == 300 and {"card_id", "amount", "ts"} <= set(events[0]["value"])
        assert len(lines(tide("tail", "labels", "--max", "7", env=env))) == 7

        bad = tmp_path / "in.jsonl"
        good = dict(events[0]["value"], event_id="from-file")
        bad.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, amount="lots")) + "\nnot json\n")
        result = tide("produce", "--file", str(bad), env=env, check=False)
        assert result.returncode == 1
        report = lines(result)[0]
        assert report["events"] == 1 and [r["line"] for r in report["rejected"]] == [2, 3]
        assert "amount" in report["rejected"][0]["error"]

        listed = {row["feature"] for row in lines(tide("features", "list", env=env))}
        got = lines(tide("features", "get", events[0]["value"]["card_id"], env=env))[0]
        assert {f for view in got["views"].values() for f in view["values"]} == listed
        assert {view["status"] for view in got["views"].values()} == {"missing"}  # no processor has run
    finally:
        down = lines(tide("down", env=env))[0]
    assert down["stopped"] is True
    for pid in (up["broker_pid"], up["redis_pid"]):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert lines(tide("status", env=env))[0]["running"] is False


def test_bad_setting_stops_a_service_with_the_key_named(tmp_path: Path) -> None:
    env = {**os.environ, "TIDE_STATE_DIR": str(tmp_path), "TIDE_SERVE_WORKERS": "0"}
    result = tide("serve", env=env, check=False)
    assert result.returncode == 2
    assert "TIDE_SERVE_WORKERS" in result.stderr


def test_training_set_from_topics(settings: CommonSettings, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    env |= {
        "TIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TIDE_REDIS_URL": settings.redis_url,
        "TIDE_TOPIC_PREFIX": settings.topic_prefix,
        "TIDE_STATE_DIR": str(tmp_path),
    }
    tide("produce", "--count", "400", "--label-delay", "20", env=env)
    out = tmp_path / "set.avro"
    summary = lines(tide("features", "training-set", "--out", str(out), env=env))[0]
    assert summary["rows"] == 400 and summary["events"] == 400
    with out.open("rb") as fh:
        rows = list(fastavro.reader(fh))
    events = [r["value"] for r in lines(tide("tail", "events", env=env))]
    for row in rows:
        earlier = sum(1 for e in events if e["card_id"] == row["card_id"] and e["ts"] < row["event_ts"])
        assert row["txn_count_lifetime"] == earlier
