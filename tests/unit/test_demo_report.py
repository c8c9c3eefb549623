"""The demo runner's parts that need no stack: the report, the plot, driver loading, the outbox."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from infra.errors import ConfigError, StreamError
from schemas.definitions import Project
from schemas.policy import Canary, Policy, Retrain
from tide.compare import combine
from tide.demo import DemoConfig, Outbox, load_driver, with_publish_every, without_reactions
from tide.plot import write_comparison_plot, write_plot
from tide.project import load_project
from tide.recovery import Labelled, compare, recovery
from tide.report import Recorded, ScoredIndex, assemble, histogram_quantile, serving_summary

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


def recorded(alert_event: str, concept_event: str | None = None) -> Recorded:
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
        "ts": 1000 + int(alert_event[1:]),  # raised as that event was scored
    }
    stats = [{"ts": "1", "version": "2", "trigger_event_id": "o70", "distance_km": "0.05", "_score": "0.1"}]
    alerts = [alert]
    if concept_event is not None:
        concept = {"feature": "loss", "statistic": "adwin", "kind": "concept", "version": 2}
        alerts.append({**alert, **concept, "trigger_event_id": None, "ts": 1000 + int(concept_event[1:])})
    return Recorded(
        produced={"orders": 100, "deliveries": 90},
        predictions=predictions(100, swap_at=50),
        versions=versions,
        alerts=alerts,
        stats={"eta": stats},
        dead_letters=0,
    )


def test_report_places_versions_alerts_and_drift_on_the_scored_events(
    project: Project, tmp_path: Path
) -> None:
    section = {"drift_injected_at": 60, "baselines": {"eta": 7.0}, "ok": True}
    report = assemble(
        project,
        recorded("o75", concept_event="o78"),
        section,
        metrics({"200": 100}, [0.002] * 100, 2),
        elapsed_s=10.0,
        rate=10.0,
    )
    assert report["problems"] == [] and report["ok"]
    eta = report["models"]["eta"]
    assert eta["versions_published"] == 3 and eta["swaps"] == 2 and eta["swaps_seen_by_clients"] == 1
    assert eta["online_metric"] == {"name": "MAE", "value": 3.1}
    assert eta["baseline"] == 7.0
    assert [v["at_record"] for v in eta["versions"]] == [0, 40, 80]
    first, concept = report["drift_alerts"]
    assert first["at_record"] == 75 and first["delay_records"] == 15 and first["kind"] == "input"
    assert concept["kind"] == "concept" and concept["delay_records"] == 18 and concept["delay_s"] == 1.8
    assert report["loop"]["first_alerts"]["concept"]["delay_records"] == 18
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


# --- the closed loop ------------------------------------------------------------------------------------

DRIFT_AT, TAKEOVER_AT, N = 1000, 1300, 2000


def acting(project: Project) -> Project:
    """``project`` with its model's policy acting on verdicts and on concept-drift alerts."""
    policy = Policy(canary=Canary(promote=True, rollback=True), retrain=Retrain(on=("concept",)))
    d = project.to_dict()
    d["models"] = [{**m, "policy": policy.to_dict()} for m in d["models"]]
    return dataclasses.replace(Project.from_dict(d), origins=project.origins)


def loop_recorded(*, blessed: bool = True, concept: bool = True, recover_at: int = TAKEOVER_AT) -> Recorded:
    """A run of model eta: a canary of v1 from event 300 failed at 480 and was ended by the judge at 500;
    drift at 1000 (input alert at 1050, concept at 1150); v4, refreshed on the concept alert, answers
    from 1300; the error is 1 minute, 10 after the drift until ``recover_at``."""
    preds, labels = [], {}
    for i in range(N):
        canary = 300 <= i < 500 and i % 5 == 0
        version = 1 if canary else (2 if i < 600 else 3 if i < TAKEOVER_AT else 4)
        y = 30.0 + i % 7
        error = 10.0 if DRIFT_AT <= i < recover_at and not canary else 1.0
        event = f"e{i}"
        labels[event] = y
        preds.append(
            {
                "event_id": event,
                "model": "eta",
                "version": version,
                "arm": "canary" if canary else "champion",
                "score": y + error,
                "ts": 10_000 + i,
            }
        )
    versions = [
        {"model": "eta", "version": 1, "metric_name": "MAE", "created_ts": 9000, "trigger": "schedule"},
        {"model": "eta", "version": 2, "metric_name": "MAE", "created_ts": 9500, "trigger": "schedule"},
        {"model": "eta", "version": 3, "metric_name": "MAE", "created_ts": 10_590, "trigger": "schedule"},
        {
            "model": "eta",
            "version": 4,
            "metric_name": "MAE",
            "created_ts": 10_000 + 1250,
            "parent_version": 3,
            "trigger": "concept drift alert a2",
            "blessing": {"blessed": blessed, "reason": "ok", "candidate_value": 1.2, "baseline_value": 9.5},
        },
    ]
    base = {"model": "eta", "version": 3, "value": 1.0, "threshold": 0.5, "window_size": 500}
    alerts = [
        {**base, "alert_id": "a1", "kind": "input", "feature": "distance_km", "statistic": "ks", "ts": 11_050}
    ]
    if concept:
        alerts.append(
            {
                **base,
                "alert_id": "a2",
                "kind": "concept",
                "feature": "loss",
                "statistic": "adwin",
                "ts": 11_150,
            }
        )
    verdict = {
        "verdict_id": "vd1",
        "model": "eta",
        "version": 1,
        "champion_version": 2,
        "arm": "canary",
        "outcome": "fail",
        "rule": "inferiority",
        "metric": "loss",
        "estimate": 8.9,
        "lower": 8.1,
        "upper": 9.7,
        "margin": 0.01,
        "alpha": 0.05,
        "n": 40,
        "duration_ms": 12_000,
        "action": "rollback",
        "final": True,
        "ts": 10_480,
    }
    interim = {**verdict, "verdict_id": "vd0", "outcome": "inconclusive", "final": False, "ts": 10_400}
    deployments = [
        {
            "id": "d1",
            "model": "eta",
            "action": "canary",
            "version": 1,
            "weight": 0.2,
            "source": "api",
            "ts": 10_300,
        },
        {
            "id": "d2",
            "model": "eta",
            "action": "canary",
            "version": 1,
            "weight": 0.0,
            "source": "judge",
            "reason": "verdict vd1: fail (inferiority)",
            "ts": 10_500,
        },
    ]
    return Recorded(
        produced={"orders": N},
        predictions=preds,
        versions=versions,
        alerts=alerts,
        verdicts=[interim, verdict],
        deployments=deployments,
        labels={"eta": labels},
    )


LOOP_SECTION = {"drift_injected_at": DRIFT_AT, "canary": {"model": "eta", "version": 1, "status": 202}}
APPLIED = {"eta": [{"id": "d1", "status": "applied"}, {"id": "d2", "status": "applied"}]}


def loop_report(project: Project, recorded: Recorded, **kwargs: Any) -> dict[str, Any]:
    return assemble(
        acting(project),
        recorded,
        LOOP_SECTION,
        metrics({"200": N}, [0.002] * 10, 3),
        rate=100.0,
        **{"outcomes": APPLIED, **kwargs},
    )


def test_the_report_shows_the_loop_closed(project: Project, tmp_path: Path) -> None:
    report = loop_report(project, loop_recorded())
    assert report["problems"] == [] and report["ok"]
    [verdict] = report["verdicts"]["final"]
    assert verdict["outcome"] == "fail" and verdict["action"] == "rollback" and verdict["at_record"] == 480
    assert (verdict["estimate"], verdict["lower"], verdict["upper"], verdict["n"]) == (8.9, 8.1, 9.7, 40)
    assert report["verdicts"]["interim"] == {"eta:inconclusive": 1}
    ended = report["deployments"][1]
    assert (ended["source"], ended["status"], ended["effect"], ended["at_record"]) == (
        "judge",
        "applied",
        True,
        500,
    )
    assert report["deployments"][0]["effect"] is True  # the canary answered after it was deployed
    assert [(a["kind"], a["delay_records"], a["delay_s"]) for a in report["drift_alerts"]] == [
        ("input", 50, 0.5),
        ("concept", 150, 1.5),
    ]
    eta = report["models"]["eta"]
    v4 = eta["versions"][-1]
    assert (v4["trigger"], v4["parent_version"], v4["blessing"]["blessed"]) == (
        "concept drift alert a2",
        3,
        True,
    )
    assert v4["served_from"] == TAKEOVER_AT and v4["at_record"] == 1250
    assert eta["champions"][-1] == [TAKEOVER_AT, N - 1, 4]
    rec = report["recovery"]["eta"]
    assert rec["metric"] == "MAE" and rec["pre_drift"] == 1.0 and rec["worst_after_drift"] == 10.0
    assert rec["records_to_recover"] is not None and TAKEOVER_AT - DRIFT_AT < rec["records_to_recover"] < 700
    assert report["loop"]["canary"]["deployment"]["status"] == "applied"
    assert report["loop"]["triggered_versions"]["eta"][0]["version"] == 4
    write_plot(report, tmp_path / "loop.png")
    assert (tmp_path / "loop.png").stat().st_size > 10_000


def test_the_report_says_where_the_loop_did_not_close(project: Project) -> None:
    refused = {"eta": [{"id": "d2", "status": "refused", "status_reason": "superseded"}]}
    report = loop_report(project, loop_recorded(blessed=False, concept=False), outcomes=refused)
    problems = "\n".join(report["problems"])
    assert "its canary was not applied (refused: superseded)" in problems
    assert "no concept-drift alert after the injected change" in problems
    assert "no version triggered after the change was blessed and served" in problems
    # without serving's outcomes, the prediction log decides: no canary answered after it ended
    report = loop_report(project, loop_recorded(), outcomes=None)
    assert report["deployments"][1]["status"] is None and report["ok"], report["problems"]


def test_a_policy_that_only_reports_needs_no_deployment_or_takeover(project: Project) -> None:
    recorded = loop_recorded(blessed=False)
    recorded.deployments = recorded.deployments[:1]
    recorded.verdicts[1]["action"] = None
    report = assemble(project, recorded, LOOP_SECTION, metrics({"200": N}, [], 3), reactions=False)
    assert report["ok"], report["problems"]
    assert report["reactions"] is False


def test_recovery_counts_events_until_the_metric_is_back() -> None:
    def rows(recover_at: int) -> list[Labelled]:
        out = []
        for i in range(4000):
            y = i % 10 == 0
            good = i < 2000 or i >= recover_at
            out.append(Labelled(i, y, (0.9 if y else 0.1) if good else (0.1 if y else 0.9)))
        return out

    fast = recovery(("binary"), rows(2500), 2000, window=200, step=50)
    slow = recovery(("binary"), rows(3500), 2000, window=200, step=50)
    assert fast["pre_drift"] == 1.0 and fast["target"] == 0.9 and fast["worst_after_drift"] == 0.0
    assert 500 <= fast["records_to_recover"] < 700 and 1500 <= slow["records_to_recover"] < 1700
    c = compare(fast, slow)
    assert c["recovered_sooner"] and c["better_after_drift"] and c["faster"]
    assert not compare(slow, fast)["faster"]
    never = recovery("binary", rows(10**6), 2000, window=200, step=50)
    assert never["recovered_at"] is None and compare(slow, never)["faster"]
    assert recovery("binary", rows(2500), None, window=200, step=50).get("recovered_at") is None


def test_reactions_off_rewrites_every_policy_to_report_only() -> None:
    fraud = load_project(EXAMPLES / "fraud")
    assert fraud.models["fraud"].policy.canary.promote and fraud.models["fraud"].policy.retrain.on
    quiet = without_reactions(fraud)
    for name, model in quiet.models.items():
        before = fraud.models[name].policy
        assert not model.policy.canary.promote and not model.policy.canary.rollback
        assert model.policy.retrain.on == ()
        assert model.policy.canary.min_labels == before.canary.min_labels
        assert model.policy.retrain.window == before.retrain.window
        assert model.policy.drift == before.drift


def test_the_comparison_needs_the_metric_back_sooner_with_reactions_on(
    project: Project, tmp_path: Path
) -> None:
    on = loop_report(project, loop_recorded())
    off = loop_report(project, loop_recorded(recover_at=1500))
    off["models"]["eta"]["policy"]["retrain"]["on"] = []
    off["problems"] = ["no concept-drift alert after the injected change"]  # reported, not failing
    report = combine(on, off)
    assert report["ok"], report["problems"]
    assert report["warnings"] == ["reactions off: no concept-drift alert after the injected change"]
    c = report["comparison"]["eta"]
    assert c["faster"] and c["records_to_recover"]["on"] < c["records_to_recover"]["off"]
    assert report["reactions_off"]["recovery"]["eta"]["curve"]
    worse = combine(off | {"models": on["models"], "problems": []}, on)
    assert not worse["ok"] and "not recovered faster with reactions on" in "\n".join(worse["problems"])
    failed = combine(on, off | {"serving": {**off["serving"], "non_2xx": 3}})
    assert failed["problems"] == ["reactions off: 3 scoring requests failed"]
    write_comparison_plot(on, off, tmp_path / "loop.png")
    assert (tmp_path / "loop.png").stat().st_size > 10_000
