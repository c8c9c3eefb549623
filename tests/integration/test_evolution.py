"""A source's schema evolves while the feature processor runs: a field added with a default is checked
against every registered version, old records stay readable, and a new view over the new field is
computed (old records with the default) without disturbing the running views or dead-lettering anything."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from features.processor import FeatureProcessor
from features.settings import FeatureSettings
from infra.kafka import make_producer, read_to_end
from infra.settings import CommonSettings
from infra.topics import topic
from schemas import codec, registry
from tests.e2e.test_live_project import stored
from tests.integration.test_project import LEARNER
from tests.unit.test_definitions import DEFINITIONS, EVENTS, write_project
from tide.plan import apply
from tide.processes import wait_until
from tide.project import load_project

pytestmark = pytest.mark.integration

NAMED = DEFINITIONS + '\n    PROJECT_NAME = "plant"\n'
PRESSURE_VIEW = """
pressure = FeatureView(
    "sensor_pressure", readings, sensor, [Feature("pressure_sum_1h", "sum", "pressure")], window="1h"
)
"""
EVOLVED = {**EVENTS, "fields": [*EVENTS["fields"], {"name": "pressure", "type": "double", "default": 1.0}]}


def reading(i: int, ts: int, **extra: Any) -> dict[str, Any]:
    return {
        "reading_id": f"r{i}",
        "sensor_id": f"s{i % 2}",
        "site_id": "x",
        "kind": "a",
        "value": float(i),
        "note": [],
        "ts": ts,
        **extra,
    }


def send(settings: CommonSettings, records: list[dict[str, Any]]) -> None:
    producer = make_producer(settings)
    for r in records:
        producer.produce(
            settings.topic_prefix + "readings", key=r["sensor_id"].encode(), value=codec.encode("readings", r)
        )
    assert producer.flush(30) == 0


def test_a_new_field_is_usable_by_a_new_view_while_the_processor_runs(
    settings: CommonSettings, tmp_path: Path
) -> None:
    root = write_project(tmp_path / "plant", NAMED, LEARNER)
    apply(settings, load_project(root))
    registry.load(settings)  # as a producer does: the registered schemas, version 1
    now = int(time.time() * 1000)
    old = [reading(i, now - 60_000 + i) for i in range(10)]
    send(settings, old)  # written with schema version 1

    feature_settings = FeatureSettings(**settings.model_dump())
    follower = registry.Follower(settings)
    processor = FeatureProcessor(feature_settings, follower.current.project, follower)
    stop = threading.Event()
    thread = threading.Thread(target=processor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        recent = registry.load(settings).project.views["sensor_recent"]
        assert wait_until(lambda: stored(settings, recent, ["s0", "s1"], now) == {"s0": 5, "s1": 5}, 60)

        # The schema gains a field with a default and a view reads it: an additive change, applied live.
        (root / "readings.avsc").write_text(json.dumps(EVOLVED))
        (root / "definitions.py").write_text((root / "definitions.py").read_text() + PRESSURE_VIEW)
        done = apply(settings, load_project(root))
        assert done["applied"] and {c["class"] for c in done["changes"]} == {"additive"}
        registry.load(settings)  # the producer's codec now writes version 2
        new = [reading(10 + i, now - 30_000 + i, pressure=10.0) for i in range(4)]
        send(settings, new)

        pressure = registry.load(settings).project.views["sensor_pressure"]
        # Old records read with the default (1.0 each), new ones with their value: backfilled, then live.
        want = {"s0": 5 * 1.0 + 2 * 10.0, "s1": 5 * 1.0 + 2 * 10.0}
        assert wait_until(lambda: stored(settings, pressure, ["s0", "s1"], now) == want, 60)
        # The running view was not disturbed: it counted every record once, of either version.
        assert stored(settings, recent, ["s0", "s1"], now) == {"s0": 7, "s1": 7}
    finally:
        stop.set()
        thread.join(20)
    letters = list(read_to_end(settings, topic(settings, "dead-letter"), 1))
    assert letters == []


def test_a_view_with_a_declared_backfill_start_folds_history_from_it(
    settings: CommonSettings, tmp_path: Path
) -> None:
    root = write_project(tmp_path / "plant", NAMED, LEARNER)
    apply(settings, load_project(root))
    registry.load(settings)
    now = int(time.time() * 1000)
    start = now - 30 * 60_000
    older = [reading(2 * i, now - 50 * 60_000 + i) for i in range(3)]  # before the declared start
    newer = [reading(2 * i, now - 20 * 60_000 + i) for i in range(3, 7)]
    send(settings, older + newer)  # sensor s0 only (even ids)

    follower = registry.Follower(settings)
    processor = FeatureProcessor(FeatureSettings(**settings.model_dump()), follower.current.project, follower)
    stop = threading.Event()
    thread = threading.Thread(target=processor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        recent = registry.load(settings).project.views["sensor_recent"]
        assert wait_until(lambda: stored(settings, recent, ["s0"], now) == {"s0": 7}, 60)
        declared = f"""
since = FeatureView(
    "sensor_since", readings, sensor, [Feature("n_since", "count")], window="1h", backfill_start={start}
)
"""
        (root / "definitions.py").write_text((root / "definitions.py").read_text() + declared)
        apply(settings, load_project(root))
        view = registry.load(settings).project.views["sensor_since"]
        assert view.backfill_start_ms == start
        # the backfill folds the events from the declared start on; live events all count
        assert wait_until(lambda: stored(settings, view, ["s0"], now) == {"s0": 4}, 60)
        send(settings, [reading(100, now - 1_000)])
        assert wait_until(lambda: stored(settings, view, ["s0"], now) == {"s0": 5}, 60)
        assert stored(settings, recent, ["s0"], now) == {"s0": 8}
    finally:
        stop.set()
        thread.join(20)
