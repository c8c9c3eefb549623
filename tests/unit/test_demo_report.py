"""The demo runner's parts that need no stack: the report, the plot, driver loading, the outbox."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from infra.errors import ConfigError, StreamError
from schemas.definitions import Project
from tide.demo import DemoConfig, Outbox, load_driver, with_publish_every
from tide.project import load_project
from tide.report import Recorded, ScoredIndex, assemble, histogram_quantile, serving_summary, write_plot

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(EXAMPLES / "food_delivery")


def metrics(statuses: Mapping[str, int], latencies_s: Iterable[float], swaps: int) -> str:
    registry = CollectorRegistry()
    requests = Counter("tide_requests_total", "", ["route", "status"], registry=registry)
    latency = Histogram(
        "tide_request_latency_seconds", "", ["route"], registry=registry, buckets=(0.001, 0.005, 0.01, 0.1)
    )
    Counter("tide_model_swaps_total", "", ["model"], registry=registry).labels("eta").inc(swaps)
    for status, n in statuses.items():
        requests.labels("score", status).inc(n)
    requests.labels("readyz", "503").inc(3)  # another route: not counted
    for s in latencies_s:
        latency.labels("score").observe(s)
    return generate_latest(registry).decode()


def test_histogram_quantile_interpolates_in_its_bucket() -> None:
    buckets = {0.001: 0.0, 0.005: 50.0, 0.01: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.005)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.003)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.0099)
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 10.0}) == 0.1  # in +Inf: the highest bound
    assert histogram_quantile(0.5, {}) is None


def test_serving_summary_counts_the_scoring_route() -> None:
    summary = serving_summary(metrics({"200": 95, "422": 5}, [0.002] * 100, 1))
    assert summary["requests"] == 100
    assert summary["non_2xx"] == 5
    assert summary["by_status"] == {"200": 95, "422": 5}
    assert 1.0 <= summary["latency_ms"]["p50"] <= 5.0


def predictions(n: int, swap_at: int) -> list[dict[str, Any]]:
    # Logged out of order, as concurrent requests are; a shadow answer that must not count.
    out = [
        {
            "event_id": f"o{i}",
            "model": "eta",
            "version": 1 if i < swap_at else 2,
            "arm": "champion",
            "ts": 1000 + i,
        }
        for i in range(n)
    ]
    out.append({"event_id": "o3", "model": "eta", "version": 9, "arm": "shadow", "ts": 1003})
    return out[::-1]


def test_scored_index_orders_by_time_and_counts_swaps() -> None:
    index = ScoredIndex.of(predictions(10, swap_at=6))
    assert index.of_event["o0"] == 0 and index.of_event["o9"] == 9
    assert index.swaps == 1
    assert index.at(1005) == 5 and index.at(0) == 0 and index.at(10**6) == 9


def recorded(alert_event: str) -> Recorded:
    versions = [
        {
            "model": "eta",
            "version": v,
            "metric_name": "MAE",
            "metric_value": m,
            "trained_on": t,
            "created_ts": c,
        }
        for v, m, t, c in ((1, None, 0, 900), (2, 4.2, 500, 1040), (3, 3.1, 1000, 1080))
    ]
    alert = {
        "model": "eta",
        "feature": "distance_km",
        "statistic": "psi",
        "value": 0.31234,
        "threshold": 0.2,
        "version": 2,
        "trigger_event_id": alert_event,
    }
    stats = [{"ts": "1", "version": "2", "trigger_event_id": "o70", "distance_km": "0.05", "_score": "0.1"}]
    return Recorded(
        produced={"orders": 100, "deliveries": 90},
        predictions=predictions(100, swap_at=50),
        versions=versions,
        alerts=[alert],
        stats={"eta": stats},
        dead_letters=0,
    )


def test_report_places_versions_alerts_and_drift_on_the_scored_events(
    project: Project, tmp_path: Path
) -> None:
    section = {"drift_injected_at": 60, "baselines": {"eta": 7.0}, "ok": True}
    report = assemble(
        project, recorded("o75"), section, metrics({"200": 100}, [0.002] * 100, 2), elapsed_s=10.0
    )
    assert report["problems"] == [] and report["ok"]
    eta = report["models"]["eta"]
    assert eta["versions_published"] == 3 and eta["swaps"] == 2 and eta["swaps_seen_by_clients"] == 1
    assert eta["online_metric"] == {"name": "MAE", "value": 3.1}
    assert eta["baseline"] == 7.0
    assert [v["at_record"] for v in eta["versions"]] == [0, 40, 80]
    assert report["drift_alerts"][0]["at_record"] == 75 and report["drift_alerts"][0]["delay_records"] == 15
    assert report["timeline"]["eta"]["drift"] == [
        {"seq": 70, "version": 2, "psi": {"distance_km": 0.05, "_score": 0.1}}
    ]
    assert report["events_produced"] == {"orders": 100, "deliveries": 90}
    assert report["requests_per_s"] == 10.0
    assert report["driver"] == section
    write_plot(report, tmp_path / "loop.png")
    assert (tmp_path / "loop.png").stat().st_size > 10_000


def test_report_names_what_is_wrong(project: Project) -> None:
    section = {"drift_injected_at": 80, "ok": False}
    report = assemble(project, recorded("o75"), section, metrics({"200": 98, "500": 2}, [], 0))
    assert not report["ok"]
    problems = "\n".join(report["problems"])
    assert "serving never swapped" in problems
    assert "2 scoring requests failed" in problems
    assert "1 drift alerts before the injection" in problems
    assert "the driver's checks failed" in problems


@pytest.mark.parametrize("name", ["fraud", "food_delivery"])
def test_each_example_has_a_driver(name: str) -> None:
    run = load_driver(EXAMPLES / name, name)
    assert callable(run)
    assert run.__module__ == f"_tide_demo_driver_{name}"


def test_a_project_without_a_driver_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no driver"):
        load_driver(tmp_path, "x")
    with pytest.raises(ConfigError, match="TIDE_PROJECT"):
        _ = DemoConfig().folder


def test_publish_every_is_overridden_for_every_model(project: Project) -> None:
    short = with_publish_every(project, 50)
    assert short.models["eta"].publish_every == 50
    assert with_publish_every(project, None) is project


class FakeClient:
    def __init__(self, fail_on: str | None = None) -> None:
        self.produced: list[tuple[str, list[Mapping[str, Any]]]] = []
        self.fail_on = fail_on
        self.gate = threading.Event()

    def produce(self, source: str, records: Iterable[Mapping[str, Any]]) -> int:
        self.gate.wait(5)
        if source == self.fail_on:
            raise StreamError("broker said no")
        batch = list(records)
        self.produced.append((source, batch))
        return len(batch)


def test_outbox_produces_in_order_per_source_and_flushes() -> None:
    client = FakeClient()
    outbox = Outbox(client)  # type: ignore[arg-type]
    for i in range(100):
        outbox.put("orders", {"i": i})
        if i % 10 == 0:
            outbox.put("deliveries", {"i": i})
    client.gate.set()
    outbox.flush(5)
    assert outbox.produced == {"orders": 100, "deliveries": 10}
    got = [r["i"] for source, batch in client.produced if source == "orders" for r in batch]
    assert got == list(range(100))
    outbox.close()


def test_outbox_failure_reaches_the_driver() -> None:
    client = FakeClient(fail_on="orders")
    client.gate.set()
    outbox = Outbox(client)  # type: ignore[arg-type]
    outbox.put("orders", {"i": 1})
    with pytest.raises(StreamError, match="broker said no"):
        outbox.flush(5)
    with pytest.raises(StreamError):
        outbox.put("orders", {"i": 2})


def test_driver_options_take_the_type_of_their_default(project: Project) -> None:
    from tide.demo import Demo

    cfg = DemoConfig(options={"warmup": "1500", "share": "0.5", "probe": "no", "bad": "many"})
    demo = Demo(None, project, None, "http://127.0.0.1:1", cfg, None, None)  # type: ignore[arg-type]
    assert demo.option("warmup", 2000) == 1500
    assert demo.option("share", 0.6) == 0.5
    assert demo.option("probe", True) is False
    assert demo.option("absent", 7) == 7
    with pytest.raises(ConfigError, match="'bad'"):
        demo.option("bad", 3)
    assert demo.scoring_url("eta") == "http://127.0.0.1:1/v1/models/eta/score"
    with pytest.raises(ConfigError, match="no model"):
        demo.scoring_url("nope")
