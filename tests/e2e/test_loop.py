"""The whole loop, end to end, at small scale: real broker, Redis, processes and HTTP."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from schemas.definitions import CARD_ACTIVITY
from features.store import RedisOnlineStore
from tide.demo import DemoConfig, DemoContext, run_demo


def recompute(events: list[dict[str, Any]], now_ms: int) -> dict[str, dict[str, float]]:
    """Count, sum and mean of amount per card over the last hour, straight from the produced events."""
    window_start = now_ms - now_ms % 60_000 - 3_600_000 + 60_000
    by_card: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e["ts"] >= window_start:
            by_card[e["card_id"]].append(e["amount"])
    return {
        card: {"txn_count_1h": len(a), "amount_sum_1h": sum(a), "amount_mean_1h": sum(a) / len(a)}
        for card, a in by_card.items()
    }


@pytest.mark.e2e
def test_whole_loop(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def inspect(ctx: DemoContext) -> None:
        now = int(time.time() * 1000)
        expected = recompute(ctx.traffic.warmup + ctx.traffic.events, now)

        async def read() -> dict[str, dict[str, float]]:
            store = RedisOnlineStore.from_url(ctx.settings.redis_url)
            try:
                rows = await store.read(CARD_ACTIVITY, sorted(expected), now)
            finally:
                await store.close()
            return {r.entity: r.values for r in rows if r.status == "present"}

        seen["expected"], seen["actual"] = expected, asyncio.run(read())

    cfg = DemoConfig(duration_s=30, rate=150, out_dir=tmp_path, publish_every=300, warmup_events=2000)
    report = run_demo(cfg, inspect)

    # a. events went in
    assert report["events_produced"] == cfg.events
    # b. features in Redis equal an independent recomputation from the produced events
    expected, actual = seen["expected"], seen["actual"]
    assert set(actual) == set(expected)
    for card, values in expected.items():
        assert actual[card]["txn_count_1h"] == values["txn_count_1h"], card
        assert actual[card]["amount_sum_1h"] == pytest.approx(values["amount_sum_1h"], rel=1e-9), card
        assert actual[card]["amount_mean_1h"] == pytest.approx(values["amount_mean_1h"], rel=1e-9), card
    assert report["feature_freshness_ms"]["p99"] is not None
    # c. the trainer learnt and published versions; d. serving swapped under concurrent load without a failure
    assert report["model_versions_published"] >= 3
    assert report["online_metric"]["value"] > 0.5
    assert report["model_swaps"] >= 2  # the bootstrap version, then at least one trained one
    assert report["model_swaps_seen_by_clients"] >= 1
    assert report["serving"]["requests"] == cfg.events
    assert report["serving"]["non_2xx"] == 0, report["errors"]
    # e. drift alerts after the injected change and none before it
    assert report["drift_alerts"], report["timeline"]["drift"][-5:]
    assert all(a["delay_records"] is not None and a["delay_records"] >= 0 for a in report["drift_alerts"])
    assert report["ok"]
    assert (tmp_path / "report.json").is_file()
    assert (tmp_path / "loop.png").stat().st_size > 10_000
