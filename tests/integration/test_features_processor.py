"""The feature processor against the real broker and Redis: exact values, dead letters, restarts."""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from features import tiles
from schemas.definitions import VIEWS
from features.store import FeatureRow, RedisOnlineStore
from tide.embedded import free_port
from infra.metrics import metric_value
from tide.processes import Services, wait_until
from infra.settings import CommonSettings
from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator
from infra.kafka import make_producer
from streams.produce import EventProducer
from streams.tail import tail
from infra.topics import topic

pytestmark = pytest.mark.integration


def read_all(settings: CommonSettings, cards: list[str], now: int) -> dict[str, dict[str, dict[str, Any]]]:
    async def go() -> dict[str, list[FeatureRow]]:
        store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        try:
            return await store.read_many(list(VIEWS.values()), cards, now)
        finally:
            await store.close()

    return {view: {r.entity: r.values for r in rows} for view, rows in asyncio.run(go()).items()}


def expected_values(events: list[dict[str, Any]], now: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Every view's values per card, from the produced events through the pure window code."""
    out = {}
    for name, view in VIEWS.items():
        deltas = tiles.batch_deltas(view, events)
        out[name] = {card: tiles.window_values(view, d.tiles, now) for card, d in deltas.items()}
    return out


def assert_exact(settings: CommonSettings, events: list[dict[str, Any]], timeout: float = 60) -> None:
    cards = sorted({e["card_id"] for e in events})

    def total() -> float:
        rows = read_all(settings, cards, int(time.time() * 1000))["card_profile"]
        return sum(v["txn_count_lifetime"] for v in rows.values())

    wait_until(lambda: total() >= len(events), timeout)
    time.sleep(1.0)  # anything double-counted would show up now
    now = int(time.time() * 1000)
    actual, expected = read_all(settings, cards, now), expected_values(events, now)
    for view in VIEWS.values():
        for card in cards:
            got, want = actual[view.name][card], expected[view.name][card]
            for agg in view.aggregations:
                where = f"{view.name}.{agg.name} of {card}"
                if agg.kind == "distinct":  # a KMV sketch: exact below DISTINCT_K values, ~6 % error above
                    assert got[agg.name] == pytest.approx(want[agg.name], rel=0.03, abs=1), where
                elif isinstance(want[agg.name], float):
                    assert got[agg.name] == pytest.approx(want[agg.name], rel=1e-9), where
                else:
                    assert got[agg.name] == want[agg.name], where


def produce(settings: CommonSettings, gen: TransactionGenerator, n: int) -> list[dict[str, Any]]:
    out = EventProducer(settings)
    events = [gen.next()[0] for _ in range(n)]
    for e in events:
        out.send_event(e)
    out.flush()
    return events


@pytest.fixture
def services(settings: CommonSettings, tmp_path: Path) -> Any:
    svc = Services(
        {
            "TIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "TIDE_REDIS_URL": settings.redis_url,
            "TIDE_TOPIC_PREFIX": settings.topic_prefix,
            "TIDE_STATE_DIR": str(tmp_path),
            "TIDE_FEATURES_GROUP": f"{settings.topic_prefix}features",
            "TIDE_FEATURES_BATCH": "200",
        },
        tmp_path / "logs",
    )
    yield svc
    svc.stop_all()


def test_values_exact_and_malformed_records_dead_lettered(
    settings: CommonSettings, services: Services
) -> None:
    gen = TransactionGenerator(GeneratorConfig(cards=300, seed=11))
    events = produce(settings, gen, 1500)
    raw = make_producer(settings)
    raw.produce(topic(settings, "events"), key=b"card-x", value=b"not avro at all")
    raw.flush(10)
    events += produce(settings, gen, 500)
    services.start("features", "features")
    assert_exact(settings, events)
    assert wait_until(lambda: len(list(tail(settings, "dead-letter"))) == 1, 10)
    letters = list(tail(settings, "dead-letter"))
    assert letters[0]["headers"]["tide.stage"] == "features"
    assert "not an Avro single-object payload" in letters[0]["headers"]["tide.error"]
    assert letters[0]["headers"]["tide.error_type"] == "SchemaError"
    assert letters[0]["headers"]["tide.source.topic"] == topic(settings, "events")
    assert not services.check_alive()


def test_sigkill_and_restart_neither_lose_nor_double_count(
    settings: CommonSettings, services: Services
) -> None:
    gen = TransactionGenerator(GeneratorConfig(cards=200, seed=5))
    events: list[dict[str, Any]] = []
    services.start("features", "features")
    for _round in range(3):
        events += produce(settings, gen, 2000)
        time.sleep(0.3)  # let it get part-way, then kill it without warning
        services.stop("features", sig=signal.SIGKILL)
        services.start("features", "features")
    events += produce(settings, gen, 1000)
    assert_exact(settings, events, timeout=90)


def test_late_events_are_dead_lettered_per_view_and_not_counted(
    settings: CommonSettings, services: Services
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
    out = EventProducer(settings)
    for e in events:
        out.send_event(e)
    out.flush()
    port = free_port()
    services.start("features", "features", env={"TIDE_METRICS_PORT": str(port)})
    assert wait_until(lambda: len(list(tail(settings, "dead-letter"))) == 2, 30)
    letters = [r["headers"] for r in tail(settings, "dead-letter")]
    assert sorted(h["tide.stage"] for h in letters) == ["features.card_activity", "features.card_daily"]
    assert all(h["tide.error_type"] == "LateEvent" and h["tide.source.offset"] == "2" for h in letters)
    values = read_all(settings, ["card-late"], now)
    assert values["card_activity"]["card-late"]["txn_count_1h"] == 2
    assert values["card_profile"]["card-late"]["txn_count_lifetime"] == 3
    assert values["card_profile"]["card-late"]["last_category"] == "fuel"
    # what it did is on its metrics endpoint, per view
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for view, folded in (("card_activity", 2), ("card_daily", 2), ("card_profile", 3)):
        assert metric_value(metrics, "tide_feature_events_total", f'view="{view}"') == folded
        assert metric_value(metrics, "tide_feature_freshness_seconds_count", f'view="{view}"') == folded
        assert metric_value(metrics, "tide_feature_redis_write_seconds_count", f'view="{view}"') >= 1
    late = metric_value(metrics, "tide_feature_late_events_total", 'fate="dead_letter",view="card_activity"')
    assert late == 1
    assert "tide_feature_consumer_lag{" in metrics


def test_rebalances_between_two_workers_stay_exact(settings: CommonSettings, services: Services) -> None:
    gen = TransactionGenerator(GeneratorConfig(cards=150, seed=8))
    services.start("worker-a", "features")
    events = produce(settings, gen, 2000)
    services.start("worker-b", "features")  # joins: partitions move while records flow
    for _ in range(3):
        events += produce(settings, gen, 1000)
        time.sleep(1.0)
    services.stop("worker-a")  # leaves cleanly: its partitions move to worker-b
    events += produce(settings, gen, 1000)
    assert_exact(settings, events, timeout=90)
    assert services.check_alive() == []


def test_a_record_is_folded_without_waiting_for_a_full_batch(
    settings: CommonSettings, services: Services
) -> None:
    """With batches of up to 1000 and a 3 s wait, a lone record is still visible at once: a batch is
    what has arrived when the processor is free, not ``features_batch`` records or the wait's end."""
    import redis

    from features.store import entity_key

    view = VIEWS["card_profile"]
    client = redis.Redis.from_url(settings.redis_url)
    gen = TransactionGenerator(GeneratorConfig(cards=50, seed=3))
    services.start(
        "features", "features", env={"TIDE_FEATURES_BATCH": "1000", "TIDE_FEATURES_BATCH_MS": "3000"}
    )

    def visible(event: dict[str, Any]) -> bool:
        ts = client.hget(entity_key(view, event["card_id"], settings.topic_prefix), "ts")
        return ts is not None and int(float(ts)) >= event["ts"]

    first = produce(settings, gen, 1)[0]
    assert wait_until(lambda: visible(first), 60)  # joined the group and applying
    took = []
    for _ in range(5):
        event = gen.next()[0]
        event["ts"] = int(time.time() * 1000)
        started = time.monotonic()
        produce_one = EventProducer(settings)
        produce_one.send_event(event)
        produce_one.flush()
        assert wait_until(functools.partial(visible, event), 10, interval=0.01)
        took.append(time.monotonic() - started)
    client.close()
    assert max(took) < 1.5, took  # consume(1000, 3 s) would have held each record for 3 s
    assert not services.check_alive()
