"""The distinct-count sketch merged by the Redis apply script equals the one merged in Python, bit for
bit, across batches that overflow it."""

from __future__ import annotations

import time

import pytest

from features import aggregations, tiles
from features.store import RedisOnlineStore, ViewBatch
from infra.settings import CommonSettings
from schemas.definitions import Project

pytestmark = pytest.mark.integration


async def test_redis_merges_the_sketch_as_python_does(
    settings: CommonSettings, fraud_project: Project
) -> None:
    view = fraud_project.views["card_activity"]  # merchants_1h: distinct merchant_id
    store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
    now = int(time.time() * 1000)
    tile_start = now - now % 60_000
    source = f"{settings.topic_prefix}events:0"
    merchants = [f"m{i}" for i in range(3 * aggregations.DISTINCT_K)]
    batches = [merchants[: aggregations.DISTINCT_K + 50], merchants[aggregations.DISTINCT_K - 50 :]]
    try:
        offset = 0
        for batch in batches:
            records = []
            for i, m in enumerate(batch):
                event = {"card_id": "card-k", "amount": 1.0, "merchant_id": m, "ts": tile_start + i % 1000}
                records.append((offset, event))
                offset += 1
            deltas = tiles.record_deltas(view, records)
            assert await store.apply([ViewBatch(view, source, deltas, offset - 1, tile_start)]) == []
        [row] = await store.read(view, ["card-k"], now_ms=now)
    finally:
        await store.close()
    hashes = {aggregations.value_hash(m) for m in merchants}
    assert row.values["merchants_1h"] == round(aggregations.distinct_estimate(hashes))  # counts are integers
    assert row.values["txn_count_1h"] == sum(len(b) for b in batches)
    assert row.values["merchants_1h"] == pytest.approx(len(merchants), rel=0.25)  # ~6 % standard error
