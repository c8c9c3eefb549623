"""The demo's plots, from the report alone (``report.json`` can be plotted again without the stack).

:func:`write_plot`, one run: per model that was scored or published (a column each), over the scored
events: the online metric as callers saw it (and each version's own metric, the driver's baseline), the
drift statistic per monitored input with the alerts of each kind, and the version answering with the
canary, the verdicts and the deployments.

:func:`write_comparison_plot`, the same project with the loop's reactions on and off
(:mod:`tide.compare`): both online-metric curves after the injected change, the alerts, and the version
answering in each run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.profile import SCORE

ALERT_COLORS = {"input": "red", "output": "orange", "concept": "purple"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _active(report: Mapping[str, Any]) -> list[str]:
    names = [
        name
        for name, m in report["models"].items()
        if m["versions_published"] or report["events_scored"].get(name)
    ]
    return names or list(report["models"]) or ["-"]


def _metric_axis(ax: Any, report: Mapping[str, Any], name: str, label: str = "callers' metric") -> str:
    """The recovery curve of ``name`` in ``report``; returns the metric's name."""
    rec = report.get("recovery", {}).get(name)
    if not rec:
        return "online metric"
    points = rec["curve"]
    ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    if rec.get("recovered_at") is not None:
        ax.axvline(rec["recovered_at"], linestyle=":", alpha=0.6, color=ax.lines[-1].get_color())
    return str(rec["metric"])


def _alert_lines(ax: Any, report: Mapping[str, Any], name: str) -> None:
    seen = set()
    for alert in report["drift_alerts"]:
        if alert["model"] != name or alert["at_record"] is None:
            continue
        kind = alert.get("kind", "input")
        ax.axvline(
            alert["at_record"],
            color=ALERT_COLORS.get(kind, "red"),
            alpha=0.35,
            label=None if kind in seen else f"{kind} alert",
        )
        seen.add(kind)


def _verdict_marks(ax: Any, report: Mapping[str, Any], name: str) -> None:
    for v in report.get("verdicts", {}).get("final", []):
        if v["model"] == name and v["at_record"] is not None:
            ax.annotate(
                f"verdict {v['outcome']} v{v['version']} ({v['rule']})",
                (v["at_record"], v["version"]),
                fontsize=7,
                xytext=(5, 5),
                textcoords="offset points",
            )
    for d in report.get("deployments", []):
        if d["model"] == name and d["at_record"] is not None:
            ax.scatter([d["at_record"]], [d.get("version") or 0], marker="v", color="green")
            ax.annotate(
                f"{d['action']}{'' if d.get('weight') in (None, 0.0) else ' ' + str(d['weight'])} "
                f"({d.get('source')})",
                (d["at_record"], d.get("version") or 0),
                fontsize=7,
                xytext=(5, -10),
                textcoords="offset points",
            )


def _refresh_marks(ax: Any, report: Mapping[str, Any], name: str, color: str | None = None) -> None:
    """A star where each version triggered by an alert first answered as champion."""
    for v in report["models"].get(name, {}).get("versions", []):
        if v.get("trigger") in (None, "", "schedule") or v.get("served_from") is None:
            continue
        blessed = (v.get("blessing") or {}).get("blessed")
        ax.scatter([v["served_from"]], [v["version"]], marker="*", s=150, color=color or "purple", zorder=5)
        ax.annotate(
            f"v{v['version']}: {str(v['trigger']).split(' alert')[0]} alert, "
            f"{'blessed' if blessed else 'unblessed'}, answering",
            (v["served_from"], v["version"]),
            fontsize=7,
            xytext=(8, -4),
            textcoords="offset points",
        )


def write_plot(report: Mapping[str, Any], path: Any) -> None:
    """One run's plot (see the module docstring)."""
    plt = _pyplot()
    names = _active(report)
    fig, grid = plt.subplots(3, len(names), figsize=(10 * len(names), 10), sharex="col", squeeze=False)
    drift_at = report.get("drift_injected_at")
    for col, name in enumerate(names):
        axes = grid[:, col]
        model = report["models"].get(name, {"versions": [], "online_metric": None, "baseline": None})
        timeline = report["timeline"].get(name, {"served": [], "drift": []})
        metric = _metric_axis(axes[0], report, name)
        measured = [v for v in model["versions"] if v["metric"] is not None]
        axes[0].plot(
            [v["at_record"] for v in measured],
            [v["metric"] for v in measured],
            marker="o",
            markersize=3,
            linestyle="none",
            label="version's own metric",
        )
        if model.get("baseline") is not None:
            axes[0].axhline(model["baseline"], color="orange", linestyle=":", label="baseline")
        axes[0].set_ylabel(metric)
        axes[0].legend(loc="lower left", fontsize=8)
        reactions = "on" if report.get("reactions", True) else "off"
        axes[0].set_title(f"Tide demo, {report['project']} / {name} (reactions {reactions})")
        points = timeline["drift"]
        for feature in sorted({f for p in points for f in p["psi"]}):
            label = "score" if feature == SCORE else feature  # matplotlib hides labels starting with "_"
            axes[1].plot([p["seq"] for p in points], [p["psi"].get(feature) for p in points], label=label)
        _alert_lines(axes[1], report, name)
        axes[1].set_ylabel("drift statistic vs reference")
        axes[1].legend(loc="upper left", fontsize=8)
        served = timeline["served"]
        axes[2].step([s for s, _ in served], [v for _, v in served], where="post", label="champion answering")
        blessed = [v for v in model["versions"] if (v.get("blessing") or {}).get("blessed", True)]
        unblessed = [v for v in model["versions"] if v not in blessed]
        for rows, color, label in (
            (blessed, "black", "published"),
            (unblessed, "red", "published, unblessed"),
        ):
            if rows:
                axes[2].scatter(
                    [v["at_record"] for v in rows],
                    [v["version"] for v in rows],
                    marker="x",
                    color=color,
                    label=label,
                )
        _finish_column(axes, report, name, "model version", drift_at)
    _save(plt, fig, path)


def _finish_column(axes: Any, report: Mapping[str, Any], name: str, ylabel: str, drift_at: Any) -> None:
    """The versions axis's marks and labels, and the injected drift across the column."""
    _verdict_marks(axes[2], report, name)
    _refresh_marks(axes[2], report, name)
    axes[2].set_ylabel(ylabel)
    axes[2].set_xlabel("scored event index")
    axes[2].legend(loc="upper left", fontsize=8)
    if drift_at is not None:
        for ax in axes:
            ax.axvline(drift_at, color="grey", linestyle="--")


def _save(plt: Any, fig: Any, path: Any) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_comparison_plot(on: Mapping[str, Any], off: Mapping[str, Any], path: Any) -> None:
    """Reactions on and off, side by side per model that both runs measured (module docstring)."""
    plt = _pyplot()
    names = [n for n in on.get("recovery", {}) if n in off.get("recovery", {})] or _active(on)
    fig, grid = plt.subplots(3, len(names), figsize=(12 * len(names), 10), sharex="col", squeeze=False)
    drift_at = on.get("drift_injected_at")
    for col, name in enumerate(names):
        axes = grid[:, col]
        metric = _metric_axis(axes[0], on, name, "reactions on")
        _metric_axis(axes[0], off, name, "reactions off")
        rec_on, rec_off = on.get("recovery", {}).get(name, {}), off.get("recovery", {}).get(name, {})
        if rec_on.get("target") is not None:
            axes[0].axhline(
                rec_on["target"], color="grey", linestyle=":", label="recovered (90 % of pre-drift)"
            )
        axes[0].set_ylabel(f"{metric} of answers, last {rec_on.get('window')} labelled")
        axes[0].legend(loc="lower left", fontsize=8)
        axes[0].set_title(
            f"Tide demo, {on['project']} / {name}: records to recover on "
            f"{rec_on.get('records_to_recover')} vs off {rec_off.get('records_to_recover')}; "
            f"{metric} after the change {rec_on.get('post_drift')} vs {rec_off.get('post_drift')}"
        )
        _alert_lines(axes[1], on, name)
        for alert in on["drift_alerts"]:
            if alert["model"] == name and alert["at_record"] is not None:
                axes[1].annotate(
                    f"{alert['kind']}:{alert['feature']}",
                    (alert["at_record"], 0.5),
                    rotation=90,
                    fontsize=7,
                )
        axes[1].set_yticks([])
        axes[1].set_ylabel("alerts (reactions on)")
        axes[1].legend(loc="upper left", fontsize=8)
        for report, label in ((on, "reactions on"), (off, "reactions off")):
            served = report["timeline"].get(name, {"served": []})["served"]
            axes[2].step([s for s, _ in served], [v for _, v in served], where="post", label=label)
        _finish_column(axes, on, name, "champion version answering", drift_at)
    _save(plt, fig, path)
