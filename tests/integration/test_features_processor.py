"""The faust feature processor against the real broker and Redis: exact values, dead letters, restarts."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from features.definitions import CARD_ACTIVITY
from features.store import RedisOnlineStore
from infra.processes import Services, wait_until
from infra.settings import CommonSettings
from streams.generator import GeneratorConfig, TransactionGenerator
from streams.kafka import make_producer
from streams.produce import EventProducer
from streams.tail import tail
from streams.topics import topic

pytestmark = pytest.mark.integration


def read_all(settings: CommonSettings, cards: list[str]) -> dict[str, dict[str, float]]:
    async def go() -> dict[str, dict[str, float]]:
        store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        try:
            return {r.entity: r.values for r in await store.read(CARD_ACTIVITY, cards)}
        finally:
            await store.close()

    return asyncio.run(go())


def expected_values(events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    amounts: dict[str, list[float]] = defaultdict(list)
    for e in events:
        amounts[e["card_id"]].append(e["amount"])
    return {c: {"txn_count_1h": len(a), "amount_sum_1h": sum(a)} for c, a in amounts.items()}


def assert_exact(settings: CommonSettings, events: list[dict[str, Any]], timeout: float = 60) -> None:
    expected = expected_values(events)
    cards = sorted(expected)

    def total() -> float:
        return sum(v["txn_count_1h"] for v in read_all(settings, cards).values())

    wait_until(lambda: total() >= len(events), timeout)
    time.sleep(1.0)  # anything double-counted would show up now
    actual = read_all(settings, cards)
    for card in cards:
        assert actual[card]["txn_count_1h"] == expected[card]["txn_count_1h"], card
        assert actual[card]["amount_sum_1h"] == pytest.approx(expected[card]["amount_sum_1h"], rel=1e-9), card


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
    assert "magic" in letters[0]["headers"]["tide.error"].lower() or letters[0]["headers"]["tide.error"]
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
