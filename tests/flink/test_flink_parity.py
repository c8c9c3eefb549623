"""Parity: the Flink job writes the same Redis tiles as the single-machine path, and replays are no-ops.

The fraud example's views of its ``transactions`` source (its definitions as the registry holds them,
passed to the job with ``--definitions``) over the same events (TransactionGenerator, fixed seed and
clock, 3 % of them delayed by up to 9 minutes so some are late for a 5-minute allowed lateness and none
for a 1-hour one, plus one undecodable line) go (a) through ``tiles.fold_partition`` and
:meth:`RedisOnlineStore.apply` in batches of one fake source partition, as the online processor
folds them, under namespace ``A:``, and (b) through the Flink job on a local mini-cluster (parallelism
2, 16 buckets) under ``B:``. Every key of every view is compared field by field.

Exactness: every field is equal as a string, except packed tile partials, which are compared slot by
slot: the float sums (``s:``, ``q:`` slots) are added in different groupings by the two paths (batches of
500 per partition vs. per-bucket flushes), so they agree to a relative 1e-9, not bit for bit; every
other slot (counts, histogram buckets, extremes, last values, distinct sketches) is equal. The positions
hashes (position sources are named differently) are left out of the raw comparison (they are not
``tide:f:`` keys) and checked on their own; each key's own position (``@parity:0``, its last record's)
is compared like any field.

Runs in .venv-flink (`make test-flink`), never in the main test run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import redis

from features import tiles
from features.store import RedisOnlineStore, ViewBatch, positions_key, unpack
from schemas import codec
from schemas.definitions import Project
from tide.project import load_project

ROOT = Path(__file__).resolve().parents[2]
FRAUD = ROOT / "examples" / "fraud"


def _generator() -> Any:
    """The fraud example's generator module, loaded by path: its package's ``__init__`` pulls in the
    traffic driver (aiohttp), which this venv does not have."""
    spec = importlib.util.spec_from_file_location("fraud_generator", FRAUD / "driver" / "generator.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
DAY_MS = 86_400_000
START_MS = (1_700_000_000_000 // DAY_MS + 1) * DAY_MS - 50 * 60_000  # 50 minutes before a UTC midnight
EVENTS = 6000  # one per second: 100 minutes, across midnight and beyond a 1-hour window
BAD_LINE = 17  # an undecodable line: a dead letter on both paths, its position still taken
BATCH = 500  # the single-machine path's batch
SOURCE = "transactions"
REL = 1e-9


def fraud_definitions(workdir: Path) -> Project:
    """The fraud example's definitions, loaded from a copy of its definitions file and schemas only (its
    model code needs river, which this venv does not have; definitions name learners, never import
    them)."""
    shutil.copy(FRAUD / "definitions.py", workdir / "definitions.py")
    shutil.copytree(FRAUD / "schemas", workdir / "schemas")
    project = load_project(workdir)
    for source in project.sources.values():
        codec.register(source.name, list(source.versions))
    return project


PROJECT = fraud_definitions(Path(tempfile.mkdtemp(prefix="tide-flink-defs-")))
VIEWS_OF_SOURCE = [v for v in PROJECT.views.values() if v.source_name == SOURCE]


def generate() -> list[dict[str, Any]]:
    clock_s = [START_MS / 1000]

    def clock() -> float:
        clock_s[0] += 1.0
        return clock_s[0]

    generator = GENERATOR.TransactionGenerator(GENERATOR.GeneratorConfig(cards=300, seed=11), clock=clock)
    jitter = random.Random(5)
    events = []
    for _ in range(EVENTS):
        event, _ = generator.next()
        if jitter.random() < 0.03:
            event["ts"] = int(event["ts"]) - jitter.randint(1, 9 * 60) * 1000  # type: ignore[call-overload]
        events.append(event)
    return events


def write_input(path: Path, events: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Writes the JSONL input; returns the decodable ``(position, event)`` records, as Kafka gives them."""
    lines = [json.dumps(e) for e in events]
    lines.insert(BAD_LINE, '{"event_id": "truncated')
    path.write_text("\n".join(lines) + "\n")
    return [
        (i, codec.decode(codec.encode(SOURCE, json.loads(line)), SOURCE))
        for i, line in enumerate(lines)
        if i != BAD_LINE
    ]


async def fold_single_machine(url: str, namespace: str, records: list[tuple[int, dict[str, Any]]]) -> None:
    """What features.processor.FeatureFolder does for one partition (it needs confluent-kafka and
    prometheus, not in this venv): every view of the source folded and applied at once."""
    store = RedisOnlineStore.from_url(url, namespace)
    source = "parity:0"
    try:
        for start in range(0, len(records), BATCH):
            chunk = records[start : start + BATCH]
            last = chunk[-1][0]
            position, watermark = await store.position(VIEWS_OF_SOURCE[0], source)
            todo = [(o, e) for o, e in chunk if o > position]
            folded = tiles.fold_partition(VIEWS_OF_SOURCE, todo, watermark)
            writes = [
                ViewBatch(v, source, folded.deltas[v.ref], last, folded.watermark) for v in VIEWS_OF_SOURCE
            ]
            assert await store.apply(writes) == [], f"the store refused batch {start}"
    finally:
        await store.close()


def run_flink(input_path: Path, url: str, namespace: str) -> dict[str, Any]:
    definitions = input_path.with_name("definitions.json")
    definitions.write_text(json.dumps(PROJECT.to_dict()))  # as the registry holds them
    cmd = [
        sys.executable, "-m", "features.flink.job", "--input", str(input_path), "--input-name", "parity",
        "--definitions", str(definitions), "--source", SOURCE,
        "--redis-url", url, "--namespace", namespace, "--parallelism", "2", "--buckets", "16",
        "--batch", "256", "--log-level", "WARNING",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the Flink job failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def snapshot(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """Every entity key of the views under ``namespace`` (prefix removed)."""
    out: dict[str, Any] = {}
    for raw_key in client.scan_iter(match=f"{namespace}tide:f:*", count=1000):
        key = raw_key.decode()
        kind = client.type(raw_key)
        if kind == b"hash":
            fields = client.hgetall(raw_key)
            out[key[len(namespace) :]] = {f.decode(): v.decode() for f, v in fields.items()}
        else:
            assert kind == b"string", f"{key}: unexpected {kind!r}"  # a HyperLogLog
            out[key[len(namespace) :]] = ("pfcount", client.pfcount(raw_key))
    return out


def same_value(a: str, b: str) -> bool:
    """Equal, or both packed partials with the same slots, sums within REL and everything else equal."""
    if a == b:
        return True
    if "=" not in a or "=" not in b:
        return False
    x, y = unpack(a), unpack(b)
    if x.keys() != y.keys():
        return False
    for slot, value in x.items():
        if slot.startswith(("s:", "q:")):
            if not math.isclose(value, y[slot], rel_tol=REL):
                return False
        elif value != y[slot]:
            return False
    return True


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    problems = [f"only in A: {k}" for k in sorted(a.keys() - b.keys())]
    problems += [f"only in B: {k}" for k in sorted(b.keys() - a.keys())]
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        if not isinstance(x, dict) or not isinstance(y, dict):
            if x != y:
                problems.append(f"{key}: {x} != {y}")
            continue
        if x.keys() != y.keys():
            problems.append(f"{key}: fields {sorted(x.keys() ^ y.keys())} in one only")
        problems += [
            f"{key} {f}: {x[f]} != {y[f]}" for f in sorted(x.keys() & y.keys()) if not same_value(x[f], y[f])
        ]
    return problems


@pytest.fixture(scope="module")
def runs(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    events = generate()
    path = tmp_path_factory.mktemp("flink") / "parity.jsonl"
    records = write_input(path, events)
    asyncio.run(fold_single_machine(redis_url, "A:", records))
    first = run_flink(path, redis_url, "B:")
    client = redis.Redis.from_url(redis_url)
    after_first = snapshot(client, "B:")
    second = run_flink(path, redis_url, "B:")  # a replay of the same input
    return {
        "records": records,
        "url": redis_url,
        "client": client,
        "first": first,
        "second": second,
        "after_first": after_first,
    }


def test_the_input_exercises_late_events_and_windows(runs: dict[str, Any]) -> None:
    records = runs["records"]
    ts = [int(e["ts"]) for _, e in records]
    assert max(ts) - min(ts) > 90 * 60_000, "the events must span more than the 1-hour window"
    assert len({t // DAY_MS for t in ts}) == 2, "the events must cross a UTC midnight (tumbling days)"
    late = {v.name: len(tiles.split_late(v, records, tiles.NO_WATERMARK)[1]) for v in VIEWS_OF_SOURCE}
    assert any(late.values()) and not all(late.values()), f"late events per view: {late}"


def test_raw_redis_hashes_match_field_by_field(runs: dict[str, Any]) -> None:
    client = runs["client"]
    a, b = snapshot(client, "A:"), snapshot(client, "B:")
    # one hash per card and view: ~200 cards, three views, several tiles each
    assert len(a) > 450, "too few keys for the comparison to mean anything"
    assert sum(len(fields) for fields in a.values()) > 1500, "too few fields for the comparison"
    problems = differences(a, b)
    assert not problems, f"{len(problems)} differences, first ones:\n" + "\n".join(problems[:20])


def test_feature_values_read_the_same(runs: dict[str, Any]) -> None:
    entities = sorted({str(e["card_id"]) for _, e in runs["records"]})
    newest = max(int(e["ts"]) for _, e in runs["records"])

    async def read(namespace: str, now_ms: int) -> dict[str, list[Any]]:
        store = RedisOnlineStore.from_url(runs["url"], namespace)
        try:
            return await store.read_many(VIEWS_OF_SOURCE, entities, now_ms)
        finally:
            await store.close()

    for now_ms in (newest, newest + 30 * 60_000, newest + 2 * 3_600_000):
        a, b = asyncio.run(read("A:", now_ms)), asyncio.run(read("B:", now_ms))
        for view in VIEWS_OF_SOURCE:
            for row_a, row_b in zip(a[view.name], b[view.name], strict=True):
                assert (row_a.status, row_a.newest_event_ms) == (row_b.status, row_b.newest_event_ms)
                for name, x in row_a.values.items():
                    y = row_b.values[name]
                    ok = math.isclose(x, y, rel_tol=REL, abs_tol=1e-6) if isinstance(x, float) else x == y
                    assert ok, f"{view.name} {row_a.entity} {name} at {now_ms}: {x!r} != {y!r}"


def test_positions_and_watermarks(runs: dict[str, Any]) -> None:
    client: redis.Redis = runs["client"]
    last = runs["records"][-1][0]
    view = VIEWS_OF_SOURCE[0]
    a = {k.decode(): int(v) for k, v in client.hgetall(positions_key(view, "A:")).items()}
    b = {k.decode(): int(v) for k, v in client.hgetall(positions_key(view, "B:")).items()}
    for other in VIEWS_OF_SOURCE[1:]:  # each view version has its own positions, here all alike
        assert {k.decode(): int(v) for k, v in client.hgetall(positions_key(other, "A:")).items()} == a
    assert a == {"parity:0": last, "parity:0:wm": a["parity:0:wm"]}
    assert a["parity:0:wm"] == max(int(e["ts"]) for _, e in runs["records"])
    positions = {k: v for k, v in b.items() if not k.endswith(":wm")}
    assert positions and all(k.startswith("flink:parity:0:card_id:") for k in positions), sorted(b)
    assert max(positions.values()) == last
    # each bucket's watermark is the partition's as of that bucket's last record
    assert max(v for k, v in b.items() if k.endswith(":wm")) == a["parity:0:wm"]


def test_stats_and_replay_is_a_no_op(runs: dict[str, Any]) -> None:
    first, second = runs["first"], runs["second"]
    assert first["records"] > 0 and first["applied"] > 0 and first["refused"] == 0
    assert second["applied"] == 0 and second["events"] == 0, second
    assert not differences(runs["after_first"], snapshot(runs["client"], "B:"))
