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
- ``drift_injected_at`` (from the driver) and ``drift_alerts`` [{model, kind, feature, feature_type,
  statistic, value, threshold, p_value, estimate_before/after, model_version, at_record, delay_records,
  delay_s, ...}];
- ``verdicts`` {final: [{model, version, champion_version, outcome, rule, estimate, lower, upper, n,
  action, at_record, ...}], interim: {model:outcome: count}} from the ``canary-verdicts`` topic;
- ``deployments`` [{id, model, action, version, weight, source, reason, at_record, status, effect}]:
  every deployment published, with serving's outcome;
- per model ``versions`` also carry ``parent_version``, ``trigger``, ``blessing`` and ``served_from``
  (the first index it answered as champion); ``champions`` [[from, to, version]];
- ``recovery`` per model with labels: the online metric as callers saw it and, after an injected
  change, how fast it came back (:mod:`tide.recovery`);
- ``loop``: a summary of the closed loop (:func:`tide.loop_report.loop_summary`);
- ``reactions``: whether the models' policies acted (False: the run applied them only reporting);
- ``dead_letters``; ``timeline`` per model: ``served`` [[index, version]], ``drift`` [{seq, version, psi}];
- ``driver``: the driver's own section.

The x axis is every answer a caller received (champion and canary arms; a shadow's answer is never
returned), in the order logged; ``served`` and the recovery curve are the champion arm's.
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
from schemas.definitions import Project
from streams.drift import stats_key
from streams.tail import tail
from tide import loop_report, recovery

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
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # canary_verdict records
    deployments: list[dict[str, Any]] = field(default_factory=list)  # deployment records
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> event id -> label


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
    by_source: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, dict[str, Any]] = {}
    for spec_of in project.models.values():
        if spec_of.labels is None:
            continue
        spec = spec_of.labels
        if spec.source.name not in by_source:
            by_source[spec.source.name] = [
                r["value"] for r in tail(settings, spec.source.name, project=project) if "value" in r
            ]
        labels[spec_of.name] = {
            str(r[spec.key]): r[spec.target]
            for r in by_source[spec.source.name]
            if r.get(spec.key) is not None
        }
    return Recorded(
        produced=produced,
        predictions=values("predictions"),
        versions=values("models"),
        alerts=values("drift-alerts"),
        stats=stats,
        dead_letters=sum(1 for _ in tail(settings, "dead-letter")),
        verdicts=values("canary-verdicts"),
        deployments=values("deployments"),
        labels=labels,
    )


@dataclass
class ScoredIndex:
    """One model's answers to callers (champion and canary arms) in the order their predictions were
    logged: the report's x axis."""

    ts: list[int] = field(default_factory=list)  # prediction time of each index
    of_event: dict[str, int] = field(default_factory=dict)  # event id -> index
    served: list[tuple[int, int]] = field(default_factory=list)  # (index, champion version)

    @classmethod
    def of(cls, predictions: Iterable[Mapping[str, Any]]) -> ScoredIndex:
        out = cls()
        answered = [p for p in predictions if p.get("arm", "champion") != "shadow"]
        for i, p in enumerate(sorted(answered, key=lambda p: p["ts"])):
            out.ts.append(int(p["ts"]))
            if p.get("event_id"):
                out.of_event.setdefault(str(p["event_id"]), i)
            if p.get("arm", "champion") == "champion":
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
    segments = loop_report.champions(index)
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
        "policy": model.policy.to_dict(),
        "versions": loop_report.version_rows(versions, index, segments),
        "champions": segments,
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
    outcomes: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    reactions: bool = True,
    rate: float | None = None,
) -> dict[str, Any]:
    """The report of one demo run (see the module docstring). ``outcomes``: serving's deployments with
    their outcomes per model; ``rate``: scored events per second, for delays in seconds."""
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
    serving = serving_summary(metrics_text)
    scored = {name: len(ix.ts) for name, ix in index.items()}
    report: dict[str, Any] = {
        "project": project.name,
        "reactions": reactions,
        "elapsed_s": None if elapsed_s is None else round(elapsed_s, 1),
        "events_produced": recorded.produced,
        "events_scored": scored,
        "requests_per_s": round(serving["requests"] / elapsed_s, 1) if elapsed_s else None,
        "feature_freshness_ms": {**percentiles(freshness_ms), "probes": len(freshness_ms)},
        "models": models,
        "serving": serving,
        "drift_injected_at": drift_at,
        "drift_alerts": loop_report.alerts(recorded.alerts, index, drift_at, rate),
        "verdicts": loop_report.verdicts(recorded.verdicts, index),
        "deployments": loop_report.deployments(
            recorded.deployments, index, outcomes or {}, recorded.predictions
        ),
        "recovery": {
            name: recovery.recovery(
                project.models[name].task,
                recovery.joined(
                    (p for p in recorded.predictions if p.get("model") == name),
                    index[name].of_event,
                    recorded.labels[name],
                ),
                drift_at,
                window=_window(scored[name]),
                step=max(_window(scored[name]) // 4, 1),
            )
            for name in project.models
            if scored[name] and recorded.labels.get(name)
        },
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
    report["loop"] = loop_report.loop_summary(report)
    report["problems"] = problems(report, section) + loop_report.loop_problems(report, project, section)
    report["ok"] = not report["problems"]
    return report


def _window(scored: int) -> int:
    """Events per point of the recovery curve: a twentieth of the run, at least 300 and at most 1000."""
    return min(max(scored // 20, 300), 1000)


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
            what = sorted({f"{a['kind']}:{a['model']}/{a['feature']}" for a in early})
            out.append(
                f"{len(early)} drift alerts before the injection (or not tied to a scored event): {what}"
            )
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
    outcomes: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    reactions: bool = True,
    rate: float | None = None,
) -> dict[str, Any]:
    """Read back what the loop recorded and assemble the report."""
    return assemble(
        project,
        read_back(settings, project),
        section,
        metrics_text,
        freshness_ms=freshness_ms,
        elapsed_s=None if window is None else window[1] - window[0],
        outcomes=outcomes,
        reactions=reactions,
        rate=rate,
    )
