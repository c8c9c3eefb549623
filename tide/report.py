"""The demo's report: numbers read back from the topics, the serving metrics and the driver's own
measurements, and a plot of the online metric, the drift statistic and the model versions over time."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import redis

from infra.metrics import metric_value
from infra.settings import CommonSettings
from models.profile import SCORE
from streams.drift import stats_key
from streams.tail import tail
from examples.fraud.driver.traffic import percentiles

if TYPE_CHECKING:
    from tide.demo import DemoConfig
    from examples.fraud.driver.traffic import Traffic


def _drift_points(settings: CommonSettings, traffic: Traffic) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        entries: list[tuple[str, dict[str, str]]] = client.xrange(  # type: ignore[assignment]
            stats_key(settings.model_name, settings.topic_prefix)
        )
    finally:
        client.close()
    points = []
    for _, fields in entries:
        seq = traffic.seq_of.get(fields.get("trigger_event_id", ""))
        if seq is None:
            continue
        stats = {k: float(v) for k, v in fields.items() if k not in ("ts", "version", "trigger_event_id")}
        points.append({"seq": seq, "version": int(fields.get("version", 0)), "psi": stats})
    return points


def build_report(
    cfg: DemoConfig, settings: CommonSettings, traffic: Traffic, metrics_text: str
) -> dict[str, Any]:
    versions = [r["value"] for r in tail(settings, "models") if "value" in r]
    versions = [v for v in versions if v["model"] == settings.model_name]
    alerts = [r["value"] for r in tail(settings, "drift-alerts") if "value" in r]
    dead_letters = sum(1 for _ in tail(settings, "dead-letter"))
    metric_versions = [v for v in versions if v["metric_value"] is not None]
    last_metric = metric_versions[-1] if metric_versions else None
    served = sorted(traffic.versions_seen)
    client_swaps = sum(1 for (_, a), (_, b) in itertools.pairwise(served) if b != a)
    client = traffic.summary()
    drift_alerts = []
    for alert in alerts:
        seq = traffic.seq_of.get(alert.get("trigger_event_id") or "")
        drift_alerts.append(
            {
                "feature": alert["feature"],
                "statistic": alert["statistic"],
                "value": round(alert["value"], 4),
                "threshold": alert["threshold"],
                "model_version": alert["version"],
                "at_record": seq,
                "delay_records": None if seq is None else seq - cfg.drift_at,
            }
        )
    report: dict[str, Any] = {
        "events_produced": len(traffic.events),
        "labels_produced": traffic.labels,
        "events_per_s": client["events_per_s"],
        "feature_freshness_ms": percentiles(traffic.freshness_ms),
        "model_versions_published": len(versions),
        "model_swaps": int(
            metric_value(metrics_text, "tide_model_swaps_total", f'model="{settings.model_name}"') or 0
        ),
        "model_swaps_seen_by_clients": client_swaps,
        "online_metric": {"name": last_metric["metric_name"], "value": round(last_metric["metric_value"], 4)}
        if last_metric
        else None,
        "serving": {
            "requests": client["requests"],
            "non_2xx": client["non_2xx"],
            "latency_ms": client["latency_ms"],
        },
        "drift_injected_at": cfg.drift_at,
        "drift_alerts": drift_alerts,
        "dead_letters": dead_letters,
        "errors": traffic.errors[:20],
        "timeline": {
            "versions": [
                {
                    "version": v["version"],
                    "seq": traffic.seq_at(v["created_ts"]),
                    "metric": v["metric_value"],
                    "trained_on": v["trained_on"],
                }
                for v in versions
            ],
            "served": served[:: max(len(served) // 400, 1)],
            "drift": _drift_points(settings, traffic),
        },
    }
    before = [a for a in drift_alerts if a["delay_records"] is None or a["delay_records"] < 0]
    report["ok"] = bool(
        report["events_produced"]
        and len(versions) >= 2
        and report["model_swaps"] >= 1
        and client["non_2xx"] == 0
        and client["requests"] == len(traffic.events)
        and drift_alerts
        and not before
    )
    return report


def write_plot(report: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["timeline"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    drift_at = report["drift_injected_at"]
    vs = [v for v in timeline["versions"] if v["metric"] is not None]
    axes[0].plot([v["seq"] for v in vs], [v["metric"] for v in vs], marker="o")
    axes[0].set_ylabel(report["online_metric"]["name"] if report["online_metric"] else "online metric")
    axes[0].set_title("Tide demo: online metric, drift statistic and model versions")
    points = timeline["drift"]
    for feature in sorted({f for p in points for f in p["psi"]}):
        label = "score" if feature == SCORE else feature  # matplotlib hides labels starting with "_"
        axes[1].plot([p["seq"] for p in points], [p["psi"].get(feature) for p in points], label=label)
    for alert in report["drift_alerts"]:
        if alert["at_record"] is not None:
            axes[1].axvline(alert["at_record"], color="red", alpha=0.3)
    axes[1].set_ylabel("PSI vs reference")
    if points:
        axes[1].legend(loc="upper left", fontsize=8)
    served = timeline["served"]
    axes[2].step([s for s, _ in served], [v for _, v in served], where="post", label="version answering")
    axes[2].scatter(
        [v["seq"] for v in timeline["versions"]],
        [v["version"] for v in timeline["versions"]],
        marker="x",
        color="black",
        label="version published",
    )
    axes[2].set_ylabel("model version")
    axes[2].set_xlabel("event index")
    axes[2].legend(loc="upper left", fontsize=8)
    for ax in axes:
        ax.axvline(drift_at, color="grey", linestyle="--")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
