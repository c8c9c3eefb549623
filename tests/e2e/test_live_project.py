"""A live project changed while everything runs: real broker, Redis, `tide features|train|serve` processes
and HTTP traffic. Added while requests flow: a view and a model (served within seconds, no restart, no
failed request). Changed: a view's window (a breaking change: a new version backfilled from history, values
equal to a recomputation, the model moved to it once caught up, the old version retired). Removed: the
model (404)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from features.store import RedisOnlineStore
from features.versions import read_states
from infra.kafka import make_producer, read_to_end
from infra.settings import CommonSettings
from infra.topics import TOPICS, topic
from schemas import codec, registry
from schemas.definitions import FeatureView
from tests.unit.test_definitions import DEFINITIONS, write_project
from tide.embedded import free_port
from tide.plan import apply
from tide.processes import Services, wait_until
from tide.project import load_project

pytestmark = pytest.mark.e2e

LEARNERS = """
from river import compose, linear_model, preprocessing

def scaled(*inputs):
    return compose.Select(*inputs) | preprocessing.StandardScaler() | linear_model.LogisticRegression()

def new():
    return scaled("value", "n_1h")

def site():
    return scaled("value", "site_n")
"""
V1 = DEFINITIONS.replace('learner="learner_code:new")', 'learner="learner_code:new", publish_every=100)')
V1 += '\n    PROJECT_NAME = "plant"\n'
V2 = (
    V1
    + """
    site = Entity("site", "site_id")
    site_recent = FeatureView("site_recent", readings, site, [Feature("site_n", "count")], window="1h")
    site_model = Model("site_model", "binary", readings, ["value"], ["site_recent.site_n"], faulty,
                       learner="learner_code:site", publish_every=100)
"""
)
V3 = V2.replace('[Feature("n_1h", "count")], window="1h"', '[Feature("n_1h", "count")], window="2h"')
V4 = V3.split("    site = Entity(")[0]  # the added view, its entity and its model removed

SENSORS = [f"s{i}" for i in range(6)]
MINUTE = 60_000


def reading(i: int, ts: int, rng: random.Random) -> dict[str, Any]:
    value = rng.gauss(0, 1)
    return {
        "reading_id": f"r{i}",
        "sensor_id": SENSORS[i % len(SENSORS)],
        "site_id": f"site{i % 3}",
        "kind": "a",
        "value": value,
        "note": [],
        "ts": ts,
    }


def outcome(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "reading_id": r["reading_id"],
        "site_id": r["site_id"],
        "faulty": r["value"] > 0.8,
        "minutes": 1.0,
        "ts": r["ts"] + 1,
    }


class Traffic:
    """Scores the running model ``detector`` continuously, counting every answer by status."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[int] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                body = {
                    "entities": {"sensor_id": SENSORS[i % len(SENSORS)]},
                    "event_id": f"q{i}",
                    "features": {"value": 0.5},
                }
                try:
                    r = client.post(f"{self.url}/v1/models/detector/score", json=body)
                except httpx.HTTPError:
                    self.statuses[-1] += 1
                    continue
                self.statuses[r.status_code] += 1
                if r.status_code == 200:
                    self.versions[r.json()["version"]] += 1
                time.sleep(0.01)


ENTITIES = {"detector": {"sensor_id": "s1"}, "site_model": {"site_id": "site1"}}


def score(url: str, model: str) -> int:
    body = {"entities": ENTITIES[model], "event_id": "x", "features": {"value": 0.1}}
    try:
        return httpx.post(f"{url}/v1/models/{model}/score", json=body, timeout=5).status_code
    except httpx.HTTPError:
        return -1


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tide.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def counts(events: Sequence[dict[str, Any]], field: str, window_ms: int, now_ms: int) -> dict[str, int]:
    """Events per ``field`` value in the sliding window (one-minute tiles) ending at ``now_ms``."""
    start = now_ms - now_ms % MINUTE - window_ms + MINUTE
    out: Counter[str] = Counter(e[field] for e in events if e["ts"] >= start)
    return dict(out)


def stored(
    settings: CommonSettings, view: FeatureView, entities: Sequence[str], now_ms: int
) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        try:
            rows = await store.read(view, sorted(entities), now_ms)
        finally:
            await store.close()
        return {r.entity: r.values[view.feature_names[0]] for r in rows if r.status == "present"}

    return asyncio.run(read())


def model_versions(settings: CommonSettings, model: str) -> list[dict[str, Any]]:
    name = topic(settings, "models")
    records = [
        codec.decode(m.value(), "model_version")
        for m in read_to_end(settings, name, TOPICS["models"].partitions)
    ]
    return [r for r in records if r["model"] == model]


def test_a_project_changes_while_it_runs(settings: CommonSettings, tmp_path: Path) -> None:
    rng = random.Random(3)
    now = int(time.time() * 1000)
    # 90 minutes of history: a 1-hour and a 2-hour window hold different counts.
    history = [reading(i, now - 90 * MINUTE + i * 9_000, rng) for i in range(590)]
    root = write_project(tmp_path / "plant", V1, LEARNERS)
    apply(settings, load_project(root))
    registry.load(settings)  # the registered schemas, as a producer knows them
    producer = make_producer(settings)
    for r in history:
        producer.produce(
            settings.topic_prefix + "readings", key=r["sensor_id"].encode(), value=codec.encode("readings", r)
        )
        producer.produce(
            settings.topic_prefix + "outcomes",
            key=r["site_id"].encode(),
            value=codec.encode("outcomes", outcome(r)),
        )
    assert producer.flush(30) == 0

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "TIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TIDE_REDIS_URL": settings.redis_url,
        "TIDE_TOPIC_PREFIX": settings.topic_prefix,
        "TIDE_STATE_DIR": str(tmp_path / "state"),
        "TIDE_PROJECT": str(root),
        "TIDE_SERVE_PORT": str(port),
    }
    services = Services(env, tmp_path / "logs")
    traffic = Traffic(url)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        for name in ("features", "train", "serve"):
            services.start(name, name)
        assert wait_until(lambda: score(url, "detector") == 200, 120), services.log_tail("train")
        traffic.thread.start()

        # Add a view and a model while requests flow: computed (backfilled), trained and served, no restart.
        apply(settings, load_project(write_project(tmp_path / "plant_v2", V2, LEARNERS)))
        added = time.monotonic()
        assert wait_until(lambda: score(url, "site_model") == 200, 120), services.log_tail("features")
        served_after = time.monotonic() - added
        site_recent = registry.load(settings).project.views["site_recent"]
        at = int(time.time() * 1000)
        assert stored(settings, site_recent, ["site0", "site1", "site2"], at) == counts(
            history, "site_id", 3_600_000, at
        )

        # A breaking change: sensor_recent's window 1h -> 2h makes a new version, backfilled from history.
        done = apply(
            settings, load_project(write_project(tmp_path / "plant_v3", V3, LEARNERS)), allow_breaking=True
        )
        new_version = done["views"]["sensor_recent"]
        project = registry.load(settings).project
        old, new = project.view_version("sensor_recent", 1), project.views["sensor_recent"]
        assert new.version == new_version > 1 and new.window_ms == 7_200_000

        def live() -> bool:
            state = read_states(client, settings.topic_prefix).get(new.ref)
            return state is not None and state.state == "live"

        assert wait_until(live, 120), services.log_tail("features")
        at = int(time.time() * 1000)
        assert stored(settings, new, SENSORS, at) == counts(history, "sensor_id", 7_200_000, at)
        listed = [json.loads(line) for line in cli(env, "features", "versions").splitlines()]
        by_ref = {f"{v['view']}@{v['version']}": v for v in listed}
        assert by_ref[new.ref]["state"] == "live" and by_ref[new.ref]["newest"] is True
        assert by_ref[old.ref]["newest"] is False  # still kept: live until the model moved, then retired
        older = json.loads(cli(env, "features", "get", "sensor_recent", "s1", "--version", "1"))
        assert older["window"]["window_ms"] == 3_600_000

        # The model moves to the new version (trained on it, by replay), and is served with it.
        def moved() -> list[dict[str, Any]]:
            return [
                v
                for v in model_versions(settings, "detector")
                if v["view_versions"] == {"sensor_recent": new.version}
            ]

        assert wait_until(moved, 180), services.log_tail("train")
        first_on_new = min(v["version"] for v in moved())
        assert wait_until(lambda: max(traffic.versions, default=0) >= first_on_new, 60)
        assert all(v["definitions_digest"] for v in model_versions(settings, "detector"))

        # The old version is retired: no longer computed, its keys expire.
        def retired() -> bool:
            state = read_states(client, settings.topic_prefix).get(old.ref)
            return state is not None and state.state == "retired"

        assert wait_until(retired, 120), services.log_tail("features")
        # Removing the added model (breaking): it stops being served.
        apply(settings, load_project(write_project(tmp_path / "plant_v4", V4, LEARNERS)), allow_breaking=True)
        assert wait_until(lambda: score(url, "site_model") == 404, 30)
        # ... and its view is no longer computed: a new reading moves sensor_recent, not site_recent.
        at = int(time.time() * 1000)
        before = stored(settings, site_recent, ["site1"], at)
        s1 = stored(settings, new, ["s1"], at)["s1"]  # read before the reading is produced
        late = {**reading(len(history), at, rng), "sensor_id": "s1", "site_id": "site1"}
        producer.produce(settings.topic_prefix + "readings", key=b"s1", value=codec.encode("readings", late))
        assert producer.flush(10) == 0
        assert wait_until(lambda: stored(settings, new, ["s1"], int(time.time() * 1000))["s1"] == s1 + 1, 30)
        assert stored(settings, site_recent, ["site1"], at) == before
        assert "site_recent" not in {
            v["view"] for v in map(json.loads, cli(env, "features", "versions").splitlines())
        }
    finally:
        traffic.stop.set()
        if traffic.thread.is_alive():
            traffic.thread.join(15)
        services.stop_all()
        client.close()
    assert set(traffic.statuses) == {200}, (dict(traffic.statuses), services.log_tail("serve"))
    assert sum(traffic.statuses.values()) > 100
    assert served_after < 120
