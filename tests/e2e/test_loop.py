"""The whole loop, end to end, at small scale: real broker, Redis, processes and HTTP, for each example
project run by ``tide demo``'s runner with its own driver."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from features.store import RedisOnlineStore
from infra.kafka import read_to_end
from infra.settings import CommonSettings
from infra.topics import prefixed
from schemas import codec
from schemas.definitions import FeatureView, Project
from tide.demo import DemoConfig, DemoContext, run_demo

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def read_source(settings: CommonSettings, project: Project, source: str) -> list[dict[str, Any]]:
    """Every record of a source's topic, decoded: what the driver produced, read back."""
    spec = project.sources[source]
    topic = prefixed(settings, spec.topic_name)
    return [codec.decode(m.value(), spec.name) for m in read_to_end(settings, topic, spec.partitions)]


def read_store(
    settings: CommonSettings, view: FeatureView, entities: Sequence[str], now_ms: int
) -> dict[str, dict[str, Any]]:
    async def read() -> dict[str, dict[str, Any]]:
        store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        try:
            rows = await store.read(view, sorted(entities), now_ms)
        finally:
            await store.close()
        return {r.entity: r.values for r in rows if r.status == "present"}

    return asyncio.run(read())


def recompute_card_activity(events: list[dict[str, Any]], now_ms: int) -> dict[str, dict[str, float]]:
    """Count, sum and mean of amount per card over the last hour (1-minute tiles), from the events."""
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
def test_fraud_loop(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def inspect(ctx: DemoContext) -> None:
        now = int(time.time() * 1000)
        events = read_source(ctx.settings, ctx.project, "transactions")
        expected = recompute_card_activity(events, now)
        seen["expected"] = expected
        seen["actual"] = read_store(ctx.settings, ctx.project.views["card_activity"], list(expected), now)

    cfg = DemoConfig(
        project=EXAMPLES / "fraud",
        duration_s=36,
        rate=150,
        out_dir=tmp_path,
        # publish_every as declared: the judge watches each version's loss; one must serve across the change.
        # Half the stream after the change: the concept alert, the refresh and its blessing all need labels.
        options={"warmup_events": 2000, "drift_fraction": 0.5, "canary_fraction": 0.1},
    )
    report = run_demo(cfg, inspect)

    # a. events went in, and every scored one was logged as a prediction
    assert report["events_produced"]["transactions"] == 2000 + cfg.events
    assert report["events_scored"]["fraud"] == cfg.events
    assert report["driver"]["chargebacks"] == report["events_produced"]["chargebacks"] == cfg.events
    # b. features in Redis equal an independent recomputation from the produced events
    expected, actual = seen["expected"], seen["actual"]
    assert set(actual) == set(expected)
    for card, values in expected.items():
        assert actual[card]["txn_count_1h"] == values["txn_count_1h"], card
        assert actual[card]["amount_sum_1h"] == pytest.approx(values["amount_sum_1h"], rel=1e-9), card
        assert actual[card]["amount_mean_1h"] == pytest.approx(values["amount_mean_1h"], rel=1e-9), card
    assert report["feature_freshness_ms"]["p99"] is not None
    # c. the trainer learnt and published versions; d. serving swapped under concurrent load without a failure
    fraud = report["models"]["fraud"]
    assert fraud["versions_published"] >= 3
    assert fraud["online_metric"]["name"] == "ROCAUC" and fraud["online_metric"]["value"] > 0.5
    assert fraud["swaps"] >= 2  # the bootstrap version, then at least one trained one
    assert fraud["swaps_seen_by_clients"] >= 1
    assert report["serving"]["requests"] == cfg.events
    assert report["serving"]["non_2xx"] == 0, report["driver"]["errors"]
    # e. drift alerts after the injected change and none before it
    assert report["drift_injected_at"] == int(cfg.events * 0.5)
    assert report["drift_alerts"], report["timeline"]["fraud"]["drift"][-5:]
    assert all(a["delay_records"] is not None and a["delay_records"] >= 0 for a in report["drift_alerts"])
    kinds = {a["kind"] for a in report["drift_alerts"]}
    assert "input" in kinds, report["drift_alerts"]
    # f. the canary of the untrained first version was judged, failed, and the judge ended it
    canary = report["driver"]["canary"]
    assert canary["status"] == 202 and canary["version"] == 1
    [verdict] = [v for v in report["verdicts"]["final"] if v["version"] == 1]
    assert verdict["outcome"] == "fail" and verdict["action"] == "rollback" and verdict["n"] >= 150
    assert verdict["lower"] > verdict["margin"]  # worse than the champion beyond the margin
    [ended] = [d for d in report["deployments"] if d["source"] == "judge"]
    assert (ended["action"], ended["version"], ended["weight"], ended["status"]) == (
        "canary",
        1,
        0.0,
        "applied",
    )
    assert verdict["id"] in ended["reason"] and ended["effect"]
    # g. a concept alert triggers a refresh, blessed against the champion, that then answers. At this
    # small scale the loss rises (about 0.07 to 0.22 nats) for only the few hundred labels before the
    # learner's next scheduled version has adapted: resampled from the judge's own loss stream, the
    # monitor finds it within them about 3 times in 4. So this part holds when the alert came (the
    # judge's and the trainer's integration tests cover the alert and the refresh on their own), and
    # the report's own checks are then the same as the demo's.
    refreshed = [v for v in fraud["versions"] if (v["trigger"] or "").startswith("concept drift alert")]
    if "concept" in kinds:
        assert refreshed and refreshed[0]["blessing"]["blessed"] and refreshed[0]["served_from"] is not None
        assert refreshed[0]["parent_version"] is not None
        assert report["ok"], report["problems"]
    else:
        assert not refreshed
        # and nothing else is wrong: the report names only the missing alert and the refresh it would cause
        assert all("concept" in p or "triggered" in p for p in report["problems"]), report["problems"]
    assert (tmp_path / "report.json").is_file()
    assert (tmp_path / "loop.png").stat().st_size > 10_000


def mean_by(records: list[dict[str, Any]], key: str, field: str) -> dict[str, tuple[float, int]]:
    values: dict[str, list[float]] = defaultdict(list)
    for r in records:
        values[r[key]].append(r[field])
    return {k: (sum(v) / len(v), len(v)) for k, v in values.items()}


@pytest.mark.e2e
def test_food_delivery_loop(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def inspect(ctx: DemoContext) -> None:
        now = int(time.time() * 1000)
        deliveries = read_source(ctx.settings, ctx.project, "deliveries")
        seen["restaurants"] = mean_by(deliveries, "restaurant_id", "minutes")
        seen["couriers"] = mean_by(deliveries, "courier_id", "pace_min_per_km")
        views = ctx.project.views
        seen["restaurant_history"] = read_store(
            ctx.settings, views["restaurant_history"], seen["restaurants"], now
        )
        seen["courier_history"] = read_store(ctx.settings, views["courier_history"], seen["couriers"], now)

    cfg = DemoConfig(
        project=EXAMPLES / "food_delivery",
        duration_s=30,
        rate=150,
        out_dir=tmp_path,
        publish_every=300,
        options={"warmup_orders": 1500},
    )
    report = run_demo(cfg, inspect)

    assert report["events_produced"]["orders"] == 1500 + cfg.events
    assert report["events_produced"]["deliveries"] == 1500 + cfg.events
    assert report["events_scored"]["eta"] == cfg.events
    # Views over the labels stream, for both entity types, equal a recomputation from the deliveries.
    for restaurant, (minutes, n) in seen["restaurants"].items():
        row = seen["restaurant_history"][restaurant]
        assert row["restaurant_deliveries_7d"] == n, restaurant
        assert row["restaurant_minutes_7d"] == pytest.approx(minutes, rel=1e-9), restaurant
    for courier, (pace, n) in seen["couriers"].items():
        row = seen["courier_history"][courier]
        assert row["courier_deliveries"] == n, courier
        assert row["courier_pace"] == pytest.approx(pace, rel=1e-9), courier
    # The regression model learnt, was swapped in, and beats the naive estimate.
    eta = report["models"]["eta"]
    assert eta["versions_published"] >= 2
    assert eta["online_metric"]["name"] == "MAE"
    assert eta["online_metric"]["value"] < eta["baseline"] == report["driver"]["naive_mae"]
    late = report["driver"]["second_half"]
    assert late["served_mae"] < late["naive_mae"]
    assert report["serving"]["non_2xx"] == 0, report["driver"]["errors"]
    assert report["drift_injected_at"] is None and report["ok"], report["problems"]
    # Nothing changed: the judge watched the regressor's errors (minutes) and raised no concept alert.
    assert not [a for a in report["drift_alerts"] if a["kind"] == "concept"], report["drift_alerts"]
    assert (tmp_path / "loop.png").stat().st_size > 10_000
