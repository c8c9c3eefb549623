"""The demo's report: what the loop recorded, read back from the topics, the serving metrics and Redis,
and a plot of each model's online metric, drift statistic and versions over the scored events.

Nothing here knows a project's domain: the x axis is the index of a scored event, the order in which
each model's predictions were logged; the project's driver adds its own section (``report["driver"]``).

``report.json``:

- ``project``, ``elapsed_s``, ``ok``;
- ``events_produced``: records per source, read back from the source topics;
- ``events_scored``: predictions logged per model; ``requests_per_s``;
- ``feature_freshness_ms``: {p50, p99, probes} of the driver's freshness probes;
- ``models``: per model its task, ``learns_online``, ``versions_published``, ``swaps`` (serving's count
  of champion changes), ``swaps_seen_by_clients`` (version changes along the logged predictions),
  ``online_metric`` {name, value} of the newest published version that has one, ``baseline`` (the
  driver's naive predictor, when given) and ``versions`` [{version, at_record, metric, trained_on}];
- ``serving``: {requests, non_2xx, by_status, latency_ms {p50, p99}} of the scoring route, from ``/metrics``;
- ``drift_injected_at`` (from the driver) and ``drift_alerts`` [{model, feature, statistic, value,
  threshold, model_version, at_record, delay_records}];
- ``dead_letters``; ``timeline`` per model: ``served`` [[index, version]], ``drift`` [{seq, version, psi}];
- ``driver``: the driver's own section.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from infra.kafka import read_to_end
from infra.settings import CommonSettings
from infra.topics import prefixed
from models.profile import SCORE
from schemas.definitions import Project
from streams.drift import stats_key
from streams.tail import tail

SCORE_ROUTE = "score"
_MAX_SERVED_POINTS = 400


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 and p99 (nearest rank), rounded to microseconds; None when there are no values."""
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(max(math.ceil(q * len(ordered)) - 1, 0), len(ordered) - 1)]

    return {"p50": round(rank(0.50), 3), "p99": round(rank(0.99), 3)}


# --- serving metrics ------------------------------------------------------------------------------------


def samples(metrics_text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition as (name, labels, value)."""
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
    ]


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram (upper bound -> count), interpolated in its bucket
    as Prometheus does; the highest finite bound when it falls in the +Inf bucket."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    target = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= target:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((target - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def serving_summary(metrics_text: str, route: str = SCORE_ROUTE) -> dict[str, Any]:
    """Requests by status and latency quantiles of one route, from serving's ``/metrics``."""
    by_status: dict[str, int] = {}
    buckets: dict[float, float] = {}
    for name, labels, value in samples(metrics_text):
        if labels.get("route") != route:
            continue
        if name == "tide_requests_total":
            by_status[labels["status"]] = by_status.get(labels["status"], 0) + int(value)
        elif name == "tide_request_latency_seconds_bucket":
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
    latency = {}
    for key, q in (("p50", 0.50), ("p99", 0.99)):
        seconds = histogram_quantile(q, buckets)
        latency[key] = None if seconds is None else round(seconds * 1000, 3)
    return {
        "requests": sum(by_status.values()),
        "non_2xx": sum(n for status, n in by_status.items() if not status.startswith("2")),
        "by_status": dict(sorted(by_status.items())),
        "latency_ms": latency,
    }


def counter_by(metrics_text: str, name: str, label: str) -> dict[str, int]:
    """A counter's value per value of one label."""
    out: dict[str, int] = {}
    for sample, labels, value in samples(metrics_text):
        if sample == name and label in labels:
            out[labels[label]] = out.get(labels[label], 0) + int(value)
    return out


# --- what the loop recorded -----------------------------------------------------------------------------


@dataclass
class Recorded:
    """What the report is built from, read back from the stack (or made up by a test)."""

    produced: dict[str, int] = field(default_factory=dict)  # source -> records
    predictions: list[dict[str, Any]] = field(default_factory=list)  # prediction records
    versions: list[dict[str, Any]] = field(default_factory=list)  # model_version records
    alerts: list[dict[str, Any]] = field(default_factory=list)  # drift_alert records
    stats: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # model -> drift stats points
    dead_letters: int = 0


def read_back(settings: CommonSettings, project: Project) -> Recorded:
    """Everything :func:`assemble` needs, read from the topics and Redis."""

    def values(name: str) -> list[dict[str, Any]]:
        return [r["value"] for r in tail(settings, name) if "value" in r]

    produced = {
        s.name: sum(1 for _ in read_to_end(settings, prefixed(settings, s.topic_name), s.partitions))
        for s in project.sources.values()
    }
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        stats: dict[str, list[dict[str, str]]] = {}
        for model in project.models:
            entries: list[tuple[str, dict[str, str]]] = client.xrange(  # type: ignore[assignment]
                stats_key(model, settings.topic_prefix)
            )
            stats[model] = [fields for _, fields in entries]
    finally:
        client.close()
    return Recorded(
        produced=produced,
        predictions=values("predictions"),
        versions=values("models"),
        alerts=values("drift-alerts"),
        stats=stats,
        dead_letters=sum(1 for _ in tail(settings, "dead-letter")),
    )


@dataclass
class ScoredIndex:
    """One model's scored events in the order their predictions were logged: the report's x axis."""

    ts: list[int] = field(default_factory=list)  # prediction time of each index
    of_event: dict[str, int] = field(default_factory=dict)  # event id -> index
    served: list[tuple[int, int]] = field(default_factory=list)  # (index, champion version)

    @classmethod
    def of(cls, predictions: Iterable[Mapping[str, Any]]) -> ScoredIndex:
        out = cls()
        champion = [p for p in predictions if p.get("arm", "champion") == "champion"]
        for i, p in enumerate(sorted(champion, key=lambda p: p["ts"])):
            out.ts.append(int(p["ts"]))
            if p.get("event_id"):
                out.of_event.setdefault(str(p["event_id"]), i)
            out.served.append((i, int(p["version"])))
        return out

    def at(self, ts_ms: int) -> int:
        """The index of the last event scored at or before ``ts_ms`` (0 before the first)."""
        return max(bisect.bisect_right(self.ts, ts_ms) - 1, 0)

    @property
    def swaps(self) -> int:
        return sum(1 for (_, a), (_, b) in itertools.pairwise(self.served) if b != a)


def _model_section(
    name: str, project: Project, index: ScoredIndex, versions: list[dict[str, Any]], swaps: int, baseline: Any
) -> dict[str, Any]:
    model = project.models[name]
    measured = [v for v in versions if v.get("metric_value") is not None]
    last = measured[-1] if measured else None
    return {
        "task": model.task,
        "learns_online": model.learner is not None,  # batch-only models publish when `tide retrain` runs
        "versions_published": len(versions),
        "swaps": swaps,
        "swaps_seen_by_clients": index.swaps,
        "online_metric": {"name": last["metric_name"], "value": round(float(last["metric_value"]), 4)}
        if last
        else None,
        "baseline": baseline,
        "versions": [
            {
                "version": v["version"],
                "at_record": index.at(int(v["created_ts"])),
                "metric": v.get("metric_value"),
                "trained_on": v.get("trained_on"),
            }
            for v in versions
        ],
    }


def _drift_points(index: ScoredIndex, points: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    out = []
    for fields in points:
        seq = index.of_event.get(fields.get("trigger_event_id", ""))
        if seq is None:
            continue
        stats = {k: float(v) for k, v in fields.items() if k not in ("ts", "version", "trigger_event_id")}
        out.append({"seq": seq, "version": int(fields.get("version", 0)), "psi": stats})
    return out


def assemble(
    project: Project,
    recorded: Recorded,
    section: Mapping[str, Any],
    metrics_text: str,
    *,
    freshness_ms: Sequence[float] = (),
    elapsed_s: float | None = None,
) -> dict[str, Any]:
    """The report of one demo run (see the module docstring)."""
    drift_at = section.get("drift_injected_at")
    baselines = section.get("baselines") or {}
    swaps = counter_by(metrics_text, "tide_model_swaps_total", "model")
    index = {
        name: ScoredIndex.of(p for p in recorded.predictions if p.get("model") == name)
        for name in project.models
    }
    models = {
        name: _model_section(
            name,
            project,
            index[name],
            sorted((v for v in recorded.versions if v.get("model") == name), key=lambda v: v["version"]),
            swaps.get(name, 0),
            baselines.get(name),
        )
        for name in project.models
    }
    alerts = []
    for alert in recorded.alerts:
        seq = (
            index[alert["model"]].of_event.get(alert.get("trigger_event_id") or "")
            if alert["model"] in index
            else None
        )
        alerts.append(
            {
                "model": alert["model"],
                "feature": alert["feature"],
                "statistic": alert["statistic"],
                "value": round(float(alert["value"]), 4),
                "threshold": alert["threshold"],
                "model_version": alert["version"],
                "at_record": seq,
                "delay_records": None if seq is None or drift_at is None else seq - int(drift_at),
            }
        )
    serving = serving_summary(metrics_text)
    scored = {name: len(ix.ts) for name, ix in index.items()}
    report: dict[str, Any] = {
        "project": project.name,
        "elapsed_s": None if elapsed_s is None else round(elapsed_s, 1),
        "events_produced": recorded.produced,
        "events_scored": scored,
        "requests_per_s": round(serving["requests"] / elapsed_s, 1) if elapsed_s else None,
        "feature_freshness_ms": {**percentiles(freshness_ms), "probes": len(freshness_ms)},
        "models": models,
        "serving": serving,
        "drift_injected_at": drift_at,
        "drift_alerts": alerts,
        "dead_letters": recorded.dead_letters,
        "timeline": {
            name: {
                "served": [list(p) for p in ix.served[:: max(len(ix.served) // _MAX_SERVED_POINTS, 1)]],
                "drift": _drift_points(ix, recorded.stats.get(name, [])),
            }
            for name, ix in index.items()
        },
        "driver": dict(section),
    }
    report["problems"] = problems(report, section)
    report["ok"] = not report["problems"]
    return report


def problems(report: Mapping[str, Any], section: Mapping[str, Any]) -> list[str]:
    """Why a run is not ok: nothing went in, a model that learns online never published twice or never
    swapped, a scoring request failed, drift was injected and not caught (or caught before), the driver
    said so. Batch-only models are reported, not required to publish: ``tide retrain`` is run on demand."""
    out = []
    if not sum(report["events_produced"].values()):
        out.append("no events produced")
    for name, m in report["models"].items():
        if m["learns_online"] and m["versions_published"] < 2:
            out.append(f"model {name}: {m['versions_published']} versions published (want >= 2)")
        if m["learns_online"] and m["swaps"] < 1:
            out.append(f"model {name}: serving never swapped versions")
    if not report["serving"]["requests"]:
        out.append("no scoring requests")
    if report["serving"]["non_2xx"]:
        out.append(
            f"{report['serving']['non_2xx']} scoring requests failed: {report['serving']['by_status']}"
        )
    if report["drift_injected_at"] is not None:
        alerts = report["drift_alerts"]
        if not alerts:
            out.append(f"drift injected at record {report['drift_injected_at']} raised no alert")
        early = [a for a in alerts if a["delay_records"] is None or a["delay_records"] < 0]
        if early:
            out.append(f"{len(early)} drift alerts before the injection (or not tied to a scored event)")
    if section.get("ok", True) is False:
        out.append("the driver's checks failed")
    return out


def build_report(
    settings: CommonSettings,
    project: Project,
    section: Mapping[str, Any],
    metrics_text: str,
    *,
    freshness_ms: Sequence[float] = (),
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Read back what the loop recorded and assemble the report."""
    return assemble(
        project,
        read_back(settings, project),
        section,
        metrics_text,
        freshness_ms=freshness_ms,
        elapsed_s=None if window is None else window[1] - window[0],
    )


# --- the plot -------------------------------------------------------------------------------------------


def write_plot(report: Mapping[str, Any], path: Any) -> None:
    """Per model that was scored or published (a column each): online metric per version (and the
    driver's baseline), drift statistic per monitored input, and the version answering, over the scored
    events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    active = [
        name
        for name, m in report["models"].items()
        if m["versions_published"] or report["events_scored"].get(name)
    ]
    names = active or list(report["models"]) or ["-"]
    fig, grid = plt.subplots(3, len(names), figsize=(10 * len(names), 9), sharex="col", squeeze=False)
    drift_at = report.get("drift_injected_at")
    for col, name in enumerate(names):
        axes = grid[:, col]
        model = report["models"].get(name, {"versions": [], "online_metric": None, "baseline": None})
        timeline = report["timeline"].get(name, {"served": [], "drift": []})
        measured = [v for v in model["versions"] if v["metric"] is not None]
        metric = model["online_metric"]["name"] if model["online_metric"] else "online metric"
        axes[0].plot(
            [v["at_record"] for v in measured], [v["metric"] for v in measured], marker="o", label=metric
        )
        if model.get("baseline") is not None:
            axes[0].axhline(model["baseline"], color="orange", linestyle=":", label="baseline")
        axes[0].set_ylabel(metric)
        axes[0].legend(loc="upper right", fontsize=8)
        axes[0].set_title(
            f"Tide demo, {report['project']} / {name}: online metric, drift statistic, versions"
        )
        points = timeline["drift"]
        for feature in sorted({f for p in points for f in p["psi"]}):
            label = "score" if feature == SCORE else feature  # matplotlib hides labels starting with "_"
            axes[1].plot([p["seq"] for p in points], [p["psi"].get(feature) for p in points], label=label)
        for alert in report["drift_alerts"]:
            if alert["model"] == name and alert["at_record"] is not None:
                axes[1].axvline(alert["at_record"], color="red", alpha=0.3)
        axes[1].set_ylabel("PSI vs reference")
        if points:
            axes[1].legend(loc="upper left", fontsize=8)
        served = timeline["served"]
        axes[2].step([s for s, _ in served], [v for _, v in served], where="post", label="version answering")
        axes[2].scatter(
            [v["at_record"] for v in model["versions"]],
            [v["version"] for v in model["versions"]],
            marker="x",
            color="black",
            label="version published",
        )
        axes[2].set_ylabel("model version")
        axes[2].set_xlabel("scored event index")
        axes[2].legend(loc="upper left", fontsize=8)
        if drift_at is not None:
            for ax in axes:
                ax.axvline(drift_at, color="grey", linestyle="--")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
