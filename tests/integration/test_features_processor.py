"""The feature processor against the real broker and Redis: exact values for every view of every source,
poison records and late events dead-lettered, restarts, rebalances, one-round-trip reads and the
``tide features`` read-outs (list, get, training-set)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest
import redis

from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator
from features import tiles
from features.store import FeatureRow, RedisOnlineStore, entity_key, positions_key
from features.training import examples_for, read_source
from infra.kafka import make_producer, read_to_end
from infra.metrics import metric_value
from infra.settings import CommonSettings
from infra.topics import prefixed, topic
from schemas import codec
from schemas.definitions import Entity, Feature, FeatureView, Project
from schemas.registry import register_schemas
from tide.embedded import free_port
from tide.plan import apply
from tide.processes import Services, wait_until

pytestmark = pytest.mark.integration

EVENTS, LABELS = "events", "labels"  # the fraud example's topics (sources transactions, chargebacks)


def produce(
    settings: CommonSettings, records: Iterable[dict[str, Any]], source: str = "transactions"
) -> None:
    topic_name, key = {"transactions": (EVENTS, "card_id"), "chargebacks": (LABELS, "card_id")}[source]
    producer = make_producer(settings)
    for record in records:
        producer.produce(
            prefixed(settings, topic_name), key=str(record[key]).encode(), value=codec.encode(source, record)
        )
    assert producer.flush(30) == 0


def generate(gen: TransactionGenerator, n: int) -> list[dict[str, Any]]:
    return [gen.next()[0] for _ in range(n)]


def dead_letters(settings: CommonSettings) -> list[dict[str, str]]:
    """The headers of every dead letter so far."""
    out = []
    for msg in read_to_end(settings, topic(settings, "dead-letter"), 1):
        out.append({k: (v or b"").decode() for k, v in msg.headers() or []})
    return out


def read_all(
    settings: CommonSettings, views: Sequence[FeatureView], entities: list[str], now: int
) -> dict[str, dict[str, dict[str, Any]]]:
    async def go() -> dict[str, list[FeatureRow]]:
        store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        try:
            return await store.read_many(views, entities, now)
        finally:
            await store.close()

    return {view: {r.entity: r.values for r in rows} for view, rows in asyncio.run(go()).items()}


def expected_values(views: Sequence[FeatureView], events: list[dict[str, Any]], now: int) -> dict[str, Any]:
    """Every view's values per entity, from the produced events through the pure window code."""
    out = {}
    for view in views:
        deltas = tiles.batch_deltas(view, events)
        out[view.name] = {entity: tiles.window_values(view, d.tiles, now) for entity, d in deltas.items()}
    return out


def assert_same(view: FeatureView, got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    for agg in view.aggregations:
        at = f"{view.name}.{agg.name} of {where}"
        if agg.kind == "distinct":  # a KMV sketch: exact below DISTINCT_K values, ~6 % error above
            assert got[agg.name] == pytest.approx(want[agg.name], rel=0.03, abs=1), at
        elif isinstance(want[agg.name], float):
            assert got[agg.name] == pytest.approx(want[agg.name], rel=1e-9), at
        else:
            assert got[agg.name] == want[agg.name], at


def assert_exact(
    settings: CommonSettings, project: Project, events: list[dict[str, Any]], timeout: float = 60
) -> None:
    """Every view of the transactions source holds exactly ``events``, nothing lost or counted twice."""
    views = [v for v in project.views.values() if v.source_name == "transactions"]
    cards = sorted({e["card_id"] for e in events})
    profile = project.views["card_profile"]

    def total() -> float:
        rows = read_all(settings, [profile], cards, int(time.time() * 1000))["card_profile"]
        return sum(v["txn_count_lifetime"] for v in rows.values())

    wait_until(lambda: total() >= len(events), timeout)
    time.sleep(1.0)  # anything double-counted would show up now
    now = int(time.time() * 1000)
    actual, expected = read_all(settings, views, cards, now), expected_values(views, events, now)
    for view in views:
        for card in cards:
            assert_same(view, actual[view.name][card], expected[view.name][card], card)


def test_values_exact_and_malformed_and_poison_records_dead_lettered(
    fraud: CommonSettings, fraud_project: Project, services: Services
) -> None:
    gen = TransactionGenerator(GeneratorConfig(cards=300, seed=11))
    events = generate(gen, 1500)
    produce(fraud, events)
    raw = make_producer(fraud)
    raw.produce(prefixed(fraud, EVENTS), key=b"card-x", value=b"not avro at all")
    label = {"event_id": "e", "card_id": "card-x", "is_fraud": True, "event_ts": 1, "ts": 2}
    raw.produce(
        prefixed(fraud, EVENTS), key=b"card-x", value=codec.encode("chargebacks", label)
    )  # wrong record
    raw.flush(10)
    poison = [
        dict(generate(gen, 1)[0], card_id="card-poison", amount=value)
        for value in (math.nan, math.inf, -math.inf)
    ]
    produce(fraud, poison)
    more = generate(gen, 500)
    produce(fraud, more)
    events += more
    services.start("features", "features")
    assert_exact(fraud, fraud_project, events)
    assert wait_until(lambda: len(dead_letters(fraud)) == 5, 10)
    letters = dead_letters(fraud)
    assert all(h["tide.stage"] == "features" for h in letters)
    assert all(h["tide.source.topic"] == prefixed(fraud, EVENTS) for h in letters)
    # in the order processed (partitions interleave): undecodable first, by the key each was sent with
    undecodable = [h for h in letters if h["tide.error_type"] == "SchemaError"]
    poisoned = [h for h in letters if h["tide.error_type"] == "NonFiniteValue"]
    assert len(undecodable) == 2 and len(poisoned) == 3
    assert sorted("not an Avro single-object payload" in h["tide.error"] for h in undecodable) == [
        False,
        True,
    ]
    assert any("expected a transactions record, got chargebacks" in h["tide.error"] for h in undecodable)
    for h, value in zip(poisoned, ("nan", "inf", "-inf"), strict=True):  # one partition: in order
        assert f"field 'amount' is {value}, not a finite number" in h["tide.error"]
    # each says where it came from: partition and offset of the original record
    assert len({int(h["tide.source.offset"]) for h in poisoned}) == 3
    assert all(h["tide.source.partition"].isdigit() for h in letters)
    rows = read_all(fraud, list(fraud_project.views.values()), ["card-poison"], int(time.time() * 1000))
    assert rows["card_profile"]["card-poison"]["txn_count_lifetime"] == 0  # nothing of it folded
    assert not services.check_alive()  # and the processor went on


def test_a_future_event_is_dead_lettered_and_does_not_move_the_watermark(
    fraud: CommonSettings, fraud_project: Project, services: Services
) -> None:
    now = int(time.time() * 1000)
    base = {"merchant_id": "m", "category": "fuel", "country": "US", "card_present": True, "seq": None}
    card = "card-future"
    records = [
        dict(base, event_id="on-time", card_id=card, amount=1.0, ts=now - 60_000),
        dict(base, event_id="future", card_id=card, amount=100.0, ts=now + 2 * 3_600_000),  # beyond 1 h
        dict(base, event_id="later", card_id=card, amount=2.0, ts=now - 30_000),  # would be late after it
    ]
    produce(fraud, records)
    services.start("features", "features")
    assert wait_until(lambda: len(dead_letters(fraud)) == 1, 60)
    (letter,) = dead_letters(fraud)
    assert letter["tide.error_type"] == "FutureEvent" and letter["tide.source.offset"] == "1"
    assert "ahead of the wall clock" in letter["tide.error"] and "allows 3600000 ms" in letter["tide.error"]
    views = list(fraud_project.views.values())
    assert wait_until(
        lambda: read_all(fraud, views, [card], now)["card_profile"][card]["txn_count_lifetime"] == 2, 30
    )
    values = read_all(fraud, views, [card], now)
    assert (
        values["card_activity"][card]["txn_count_1h"] == 2
        and values["card_activity"][card]["amount_sum_1h"] == 3.0
    )
    client = redis.Redis.from_url(fraud.redis_url)
    stored = client.hgetall(positions_key(fraud_project.views["card_activity"], fraud.topic_prefix))
    client.close()
    watermarks = {k.decode(): int(v) for k, v in stored.items() if k.endswith(b":wm")}
    assert list(watermarks.values()) == [now - 30_000], (
        watermarks
    )  # the newest admitted event, not the future one
    assert not services.check_alive()


def test_sigkill_and_restart_neither_lose_nor_double_count(
    fraud: CommonSettings, fraud_project: Project, services: Services
) -> None:
    gen = TransactionGenerator(GeneratorConfig(cards=200, seed=5))
    events: list[dict[str, Any]] = []
    services.start("features", "features")
    for _round in range(3):
        batch = generate(gen, 2000)
        produce(fraud, batch)
        events += batch
        time.sleep(0.3)  # let it get part-way, then kill it without warning
        services.stop("features", sig=signal.SIGKILL)
        services.start("features", "features")
    batch = generate(gen, 1000)
    produce(fraud, batch)
    assert_exact(fraud, fraud_project, events + batch, timeout=90)


def test_late_events_are_dead_lettered_per_view_and_not_counted(
    fraud: CommonSettings, fraud_project: Project, services: Services
) -> None:
    now = int(time.time() * 1000)
    base = {"merchant_id": "m", "category": "fuel", "country": "US", "card_present": True, "seq": None}
    # one card, so one partition, in this order: on time, 1 min late (allowed everywhere), 10 min late
    # (beyond card_activity's and card_daily's 5 min, within card_profile's 1 h)
    times = [now, now - 60_000, now - 600_000]
    events = [
        dict(base, event_id=f"e{i}", card_id="card-late", amount=10.0 * (i + 1), ts=ts)
        for i, ts in enumerate(times)
    ]
    produce(fraud, events)
    port = free_port()
    services.start("features", "features", env={"TIDE_METRICS_PORT": str(port)})
    assert wait_until(lambda: len(dead_letters(fraud)) == 2, 30)
    letters = dead_letters(fraud)
    assert sorted(h["tide.stage"] for h in letters) == ["features.card_activity@1", "features.card_daily@1"]
    assert all(h["tide.error_type"] == "LateEvent" and h["tide.source.offset"] == "2" for h in letters)
    values = read_all(fraud, list(fraud_project.views.values()), ["card-late"], now)
    assert values["card_activity"]["card-late"]["txn_count_1h"] == 2
    assert values["card_profile"]["card-late"]["txn_count_lifetime"] == 3
    assert values["card_profile"]["card-late"]["last_category"] == "fuel"
    # what it did is on its metrics endpoint, per view
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for view, folded in (("card_activity", 2), ("card_daily", 2), ("card_profile", 3)):
        assert metric_value(metrics, "tide_feature_events_total", f'view="{view}@1"') == folded
        assert metric_value(metrics, "tide_feature_freshness_seconds_count", f'view="{view}@1"') == folded
        assert (metric_value(metrics, "tide_feature_redis_write_seconds_count", f'view="{view}@1"') or 0) >= 1
    late = metric_value(
        metrics, "tide_feature_late_events_total", 'fate="dead_letter",view="card_activity@1"'
    )
    assert late == 1
    assert "tide_feature_consumer_lag{" in metrics


def test_rebalances_between_two_workers_stay_exact(
    fraud: CommonSettings, fraud_project: Project, services: Services
) -> None:
    gen = TransactionGenerator(GeneratorConfig(cards=150, seed=8))
    services.start("worker-a", "features")
    events = generate(gen, 2000)
    produce(fraud, events)
    services.start("worker-b", "features")  # joins: partitions move while records flow
    for _ in range(3):
        batch = generate(gen, 1000)
        produce(fraud, batch)
        events += batch
        time.sleep(1.0)
    services.stop("worker-a")  # leaves cleanly: its partitions move to worker-b
    batch = generate(gen, 1000)
    produce(fraud, batch)
    assert_exact(fraud, fraud_project, events + batch, timeout=90)
    assert services.check_alive() == []


def test_a_record_is_folded_without_waiting_for_a_full_batch(
    fraud: CommonSettings, fraud_project: Project, services: Services
) -> None:
    """With batches of up to 1000 and a 3 s wait, a lone record is still visible at once: a batch is
    what has arrived when the processor is free, not ``features_batch`` records or the wait's end."""
    view = fraud_project.views["card_profile"]
    client = redis.Redis.from_url(fraud.redis_url)
    gen = TransactionGenerator(GeneratorConfig(cards=50, seed=3))
    services.start(
        "features", "features", env={"TIDE_FEATURES_BATCH": "1000", "TIDE_FEATURES_BATCH_MS": "3000"}
    )

    def visible(event: dict[str, Any]) -> bool:
        ts = client.hget(entity_key(view, event["card_id"], fraud.topic_prefix), "ts")
        return ts is not None and int(float(ts)) >= event["ts"]

    first = generate(gen, 1)[0]
    produce(fraud, [first])
    assert wait_until(lambda: visible(first), 60)  # joined the group and applying
    took = []
    for _ in range(5):
        event = dict(generate(gen, 1)[0], ts=int(time.time() * 1000))
        started = time.monotonic()
        produce(fraud, [event])
        assert wait_until(functools.partial(visible, event), 10, interval=0.01)
        took.append(time.monotonic() - started)
    client.close()
    assert max(took) < 1.5, took  # consume(1000, 3 s) would have held each record for 3 s
    assert not services.check_alive()


# --- every source, several entity types, one-round-trip reads, the read-outs --------------------------------


def extended(fraud_project: Project) -> Project:
    """The fraud example plus a view per merchant (another entity) and one over the labels source."""
    transactions, chargebacks = fraud_project.sources["transactions"], fraud_project.sources["chargebacks"]
    merchant = FeatureView(
        name="merchant_activity",
        source=transactions,
        entity=Entity("merchant", "merchant_id"),
        window="1h",
        tile="1m",
        allowed_lateness="5m",
        features=[Feature("merchant_txn_1h", "count"), Feature("merchant_amount_1h", "sum", "amount")],
    )
    outcomes = FeatureView(
        name="card_outcomes",
        source=chargebacks,
        entity=fraud_project.entities["card"],
        window="7d",
        tile="1h",
        allowed_lateness="1h",
        features=[Feature("fraud_rate_7d", "mean", "is_fraud"), Feature("labels_7d", "count")],
    )
    model = fraud_project.models["fraud"]
    more = ["merchant_activity.merchant_txn_1h", "card_outcomes.fraud_rate_7d"]
    model = dataclasses.replace(model, features=[*model.features, *more])
    return Project.of("fraud", [*fraud_project.views.values(), merchant, outcomes, model])


def run_cli(settings: CommonSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "TIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TIDE_REDIS_URL": settings.redis_url,
        "TIDE_TOPIC_PREFIX": settings.topic_prefix,
        "TIDE_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "tide.cli", "features", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_source_and_entity_read_in_one_round_trip_and_the_read_outs(
    settings: CommonSettings, fraud_project: Project, services: Services, tmp_path: Path
) -> None:
    project = extended(fraud_project)
    apply(settings, project)
    register_schemas(project)
    gen = TransactionGenerator(GeneratorConfig(cards=40, seed=21, fraud_rate=0.2, label_delay=50))
    now = int(time.time() * 1000)
    events, labels = [], []
    for i in range(600):
        event, due = gen.next()
        event["ts"] = now - 40 * 60_000 + i * 3000  # 30 minutes of events, 3 s apart
        events.append(event)
        labels += [dict(lab, ts=event["ts"]) for lab in due]
    produce(settings, events)
    produce(settings, labels, "chargebacks")
    services.start("features", "features")
    card_profile = project.views["card_profile"]

    def total() -> float:
        rows = read_all(settings, [card_profile], sorted({e["card_id"] for e in events}), now)
        return sum(v["txn_count_lifetime"] for v in rows["card_profile"].values())

    outcomes = project.views["card_outcomes"]

    def labelled() -> float:
        rows = read_all(settings, [outcomes], sorted({lab["card_id"] for lab in labels}), now)
        return sum(v["labels_7d"] for v in rows["card_outcomes"].values())

    assert wait_until(lambda: total() >= len(events) and labelled() >= len(labels), 90)
    assert dead_letters(settings) == []

    # one script call for pairs of different views, sources and entity types, in the order asked
    pairs = [
        (project.views["card_activity"], events[5]["card_id"]),
        (project.views["merchant_activity"], events[5]["merchant_id"]),
        (outcomes, labels[0]["card_id"]),
        (project.views["card_daily"], events[5]["card_id"]),
        (outcomes, "card-nobody"),
        (project.views["merchant_activity"], events[9]["merchant_id"]),
    ]

    async def read() -> tuple[list[FeatureRow], int]:
        store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            before = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
            rows = await store.read_pairs(pairs, now)
            after = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
            return rows, after - before
        finally:
            await store.close()
            await client.aclose()

    rows, calls = asyncio.run(read())
    assert calls == 1
    assert [(r.view, r.entity) for r in rows] == [(v.name, e) for v, e in pairs]
    for (view, entity), row in zip(pairs, rows, strict=True):
        records = events if view.source_name == "transactions" else labels
        want = expected_values([view], records, now)[view.name].get(entity)
        if want is None:
            assert row.status == "missing" and row.values == tiles.window_values(view, {}, now)
        else:
            assert row.status == "present", (view.name, entity)
            assert_same(view, row.values, want, entity)

    # the read-outs: list, get, training-set
    listed = [json.loads(line) for line in run_cli(settings, "list").stdout.splitlines()]
    assert {(f["view"], f["feature"]) for f in listed} == {
        (v.name, a.name) for v in project.views.values() for a in v.aggregations
    }
    got = run_cli(settings, "get", "merchant_activity", events[9]["merchant_id"])
    assert got.returncode == 0, got.stderr
    row = json.loads(got.stdout)
    assert row["status"] == "present" and row["view"] == "merchant_activity" and row["age_ms"] >= 0
    assert row["values"]["merchant_txn_1h"] >= 1 and row["window"]["window_ms"] == 3_600_000
    bad = run_cli(settings, "get", "no_such_view", "x")
    assert bad.returncode == 2 and "no feature view 'no_such_view'" in bad.stderr

    out = tmp_path / "set.avro"
    done = run_cli(settings, "training-set", "--model", "fraud", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    with out.open("rb") as fh:
        written = list(fastavro.reader(fh))
    model = project.models["fraud"]
    replayed = read_source(settings, project.sources["transactions"])
    want_examples = examples_for(
        project, model, replayed, read_source(settings, project.sources["chargebacks"])
    )
    assert summary["examples"] == len(written) == len(want_examples) == len(labels)
    for w, example in zip(written, want_examples, strict=True):
        assert w["event_id"] == example.key and w["is_fraud"] is example.y
        for name in model.input_names:
            x = example.x[name]
            assert w[name] == (pytest.approx(x) if isinstance(x, float) else x), name
    # the labels view is point-in-time: some examples already know earlier outcomes of their card
    assert any(w["fraud_rate_7d"] not in (None, 0.0) for w in written)
    assert not services.check_alive()
