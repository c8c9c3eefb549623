"""The `tide` command line as a user runs it: its own embedded stack, apply, produce, tail, features, down."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastavro
import pytest

from infra.settings import CommonSettings
from schemas import codec

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def tide(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tide.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def lines(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def stack_env(settings: CommonSettings, state_dir: Path) -> dict[str, str]:
    """The environment of a `tide` command pointed at ``settings``' stack and namespace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    return env | {
        "TIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TIDE_REDIS_URL": settings.redis_url,
        "TIDE_TOPIC_PREFIX": settings.topic_prefix,
        "TIDE_STATE_DIR": str(state_dir),
    }


def transactions(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` records of the fraud example's ``transactions`` source, over a few cards."""
    rng = random.Random(seed)
    return [
        {
            "event_id": f"e{i:05d}",
            "seq": i,
            "card_id": f"c{rng.randrange(20):03d}",
            "merchant_id": f"m{rng.randrange(50)}",
            "category": rng.choice(["grocery", "travel", "online"]),
            "amount": round(rng.lognormvariate(3.5, 0.6), 2),
            "country": rng.choice(["NL", "DE", "FR"]),
            "card_present": rng.random() < 0.75,
            "ts": 1_700_000_000_000 + i * 1000,
        }
        for i in range(n)
    ]


def chargebacks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "event_id": e["event_id"],
            "card_id": e["card_id"],
            "is_fraud": i % 7 == 0,
            "event_ts": e["ts"],
            "ts": e["ts"] + 60_000,
        }
        for i, e in enumerate(events)
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def values(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    rows = lines(proc)
    assert all("error" not in r for r in rows), rows[:3]
    return [r["value"] for r in rows]


def by_event(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["event_id"]: r for r in records}


def test_up_apply_produce_tail_down(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    env["TIDE_STATE_DIR"] = str(tmp_path / "state")
    up = lines(tide("up", env=env))[0]
    try:
        status = lines(tide("status", env=env))[0]
        assert status["running"] and status["broker"]["answering"] and status["redis"]["answering"]
        # addresses come from the running stack: no TIDE_KAFKA_BOOTSTRAP needed
        applied = lines(tide("apply", "--project", str(EXAMPLES / "fraud"), env=env))[0]
        assert applied["applied"] and applied["project"] == "fraud"
        events = transactions(300)
        produced = lines(
            tide("produce", "transactions", "--file", str(write_jsonl(tmp_path / "e.jsonl", events)), env=env)
        )
        assert produced[0]["produced"] == 300 and produced[0]["rejected"] == []
        tailed = lines(tide("tail", "transactions", env=env))
        assert len(tailed) == 300 and by_event([r["value"] for r in tailed]) == by_event(events)
        assert {r["key"] for r in tailed} == {e["card_id"] for e in events}  # keyed by the source's key
        assert len(lines(tide("tail", "events", "--max", "7", env=env))) == 7  # by the source's topic
        registry = lines(tide("tail", "registry", env=env))  # Tide's own topics decode too
        assert [r["value"]["project"] for r in registry] == ["fraud"]
    finally:
        down = lines(tide("down", env=env))[0]
    assert down["stopped"] is True
    for pid in (up["broker_pid"], up["redis_pid"]):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert lines(tide("status", env=env))[0]["running"] is False


def test_produce_jsonl_csv_and_avro_files_and_read_them_back(fraud: CommonSettings, tmp_path: Path) -> None:
    env = stack_env(fraud, tmp_path)
    events = transactions(120)
    jsonl, rest = events[:40], events[40:]

    result = tide("produce", "transactions", "--file", str(write_jsonl(tmp_path / "a.jsonl", jsonl)), env=env)
    summary = lines(result)[0]
    assert (summary["format"], summary["records"], summary["produced"]) == ("jsonl", 40, 40)
    assert summary["topic"] == fraud.topic_prefix + "events" and summary["rejected_count"] == 0
    assert "produce transactions: produced 40/40 records" in result.stderr  # progress on stderr

    # CSV: every cell is text, converted to the schema's types; the nullable seq left empty is null.
    path = tmp_path / "b.csv"
    fields = [f["name"] for f in codec.schema("transactions")["fields"]]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for e in rest[:40]:
            writer.writerow({**e, "seq": "", "card_present": str(e["card_present"]).lower()})
    summary = lines(tide("produce", "transactions", "--file", str(path), env=env))[0]
    assert (summary["format"], summary["produced"]) == ("csv", 40)

    # Avro object container, written with the source's own schema; `--format` names it explicitly.
    path = tmp_path / "c.data"
    with path.open("wb") as fh:
        fastavro.writer(fh, codec.schema("transactions"), rest[40:])
    summary = lines(tide("produce", "events", "--file", str(path), "--format", "avro", env=env))[0]
    assert (summary["format"], summary["produced"]) == ("avro", 40)

    expected = jsonl + [dict(e, seq=None) for e in rest[:40]] + rest[40:]
    assert by_event(values(tide("tail", "transactions", env=env))) == by_event(expected)

    # Another source of the project, by its topic: labels as a CSV file.
    path = tmp_path / "labels.csv"
    labels = chargebacks(events[:10])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(labels[0]))
        writer.writeheader()
        writer.writerows(labels)
    assert lines(tide("produce", "labels", "--file", str(path), env=env))[0]["produced"] == 10
    assert by_event(values(tide("tail", "chargebacks", env=env))) == by_event(labels)


def test_a_file_with_bad_lines_is_reported_and_nothing_is_sent(fraud: CommonSettings, tmp_path: Path) -> None:
    env = stack_env(fraud, tmp_path)
    events = transactions(5)
    path = tmp_path / "bad.jsonl"
    rows = [json.dumps(e) for e in events]
    rows[1] = json.dumps(dict(events[1], amount=float("nan")))  # written as NaN, which JSON readers accept
    rows[3] = json.dumps(dict(events[3], amount="lots"))
    path.write_text("\n".join(rows) + "\n")

    result = tide("produce", "transactions", "--file", str(path), env=env, check=False)
    assert result.returncode == 1
    report = lines(result)[0]
    assert report["produced"] == 0 and report["rejected_count"] == 2
    assert [r["line"] for r in report["rejected"]] == [2, 4]
    assert "'amount': nan is not a finite number" in report["rejected"][0]["error"]
    assert "field 'amount': expected double, got str 'lots'" in report["rejected"][1]["error"]
    assert "line 2: " in result.stderr and "line 4: " in result.stderr
    assert lines(tide("tail", "transactions", env=env)) == []  # nothing was sent, not even the good lines

    unknown = tide("tail", "nothing", env=env, check=False)
    assert unknown.returncode == 2 and "no source or source topic 'nothing'" in unknown.stderr


def test_bad_setting_stops_a_service_with_the_key_named(tmp_path: Path) -> None:
    env = {**os.environ, "TIDE_STATE_DIR": str(tmp_path), "TIDE_SERVE_WORKERS": "0"}
    result = tide("serve", env=env, check=False)
    assert result.returncode == 2
    assert "TIDE_SERVE_WORKERS" in result.stderr


def test_features_read_outs_after_produce(fraud: CommonSettings, tmp_path: Path) -> None:
    env = stack_env(fraud, tmp_path)
    events = transactions(400)
    tide("produce", "transactions", "--file", str(write_jsonl(tmp_path / "e.jsonl", events)), env=env)
    tide(
        "produce",
        "chargebacks",
        "--file",
        str(write_jsonl(tmp_path / "l.jsonl", chargebacks(events))),
        env=env,
    )

    listed = lines(tide("features", "list", env=env))
    card = events[0]["card_id"]
    for view in sorted({row["view"] for row in listed}):
        got = lines(tide("features", "get", view, card, env=env))[0]
        assert set(got["values"]) == {row["feature"] for row in listed if row["view"] == view}
        assert (got["view"], got["entity"], got["status"]) == (view, card, "missing")  # no processor ran

    out = tmp_path / "set.avro"
    summary = lines(tide("features", "training-set", "--model", "fraud", "--out", str(out), env=env))[0]
    assert summary["examples"] == 400
    with out.open("rb") as fh:
        rows = list(fastavro.reader(fh))
    by_id = by_event(events)
    for row in rows:
        event = by_id[row["event_id"]]
        earlier = sum(1 for e in events if e["card_id"] == event["card_id"] and e["ts"] < event["ts"])
        assert row["txn_count_lifetime"] == earlier
