"""The closed loop in the demo's report: canary verdicts and the deployments they caused, alerts of each
kind with their delays, versions with lineage and blessing, which version served when, and the checks
that the loop closed.

Positions are indexes of scored events (:class:`tide.report.ScoredIndex`): a record the services wrote
at time ``ts`` is placed at the last event scored by then (``at_record``); a delay is counted in scored
events after the driver's injected change (``drift_injected_at``), and in seconds at the driver's rate.

Checks (:func:`loop_problems`), each only where the run asks for it:

- the driver deployed a canary: it was accepted, a final verdict on it exists, and when the model's
  policy acts on verdicts (``Canary(promote=..., rollback=...)``) the deployment the judge published
  for it was applied by serving;
- a change was injected: at least one input-drift and one concept-drift alert after it (concept only
  for models whose policy watches it), none before;
- a change was injected and a scored model's policy retrains on alerts: a version triggered by an alert
  after the change was blessed and answered as champion.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.definitions import Project
    from tide.report import ScoredIndex

SCHEDULE = "schedule"
# Canary answers logged up to this long after an ending deployment was published still count as in
# flight (serving applies a deployment when it reads it back; the judge's is committed with its checkpoint).
IN_FLIGHT_MS = 3000
VERDICT_FIELDS = (
    "version",
    "champion_version",
    "arm",
    "outcome",
    "rule",
    "metric",
    "estimate",
    "lower",
    "upper",
    "margin",
    "alpha",
    "n",
    "n_champion",
    "action",
    "guardrails",
)


def _round(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def champions(index: ScoredIndex) -> list[list[int]]:
    """``[[first index, last index, version], ...]``: which version answered as champion when."""
    out: list[list[int]] = []
    for version, run in itertools.groupby(index.served, key=lambda p: p[1]):
        points = list(run)
        out.append([points[0][0], points[-1][0], version])
    return out


def verdicts(records: Sequence[Mapping[str, Any]], index: Mapping[str, ScoredIndex]) -> dict[str, Any]:
    """Final verdicts in full, interim ones counted by outcome per model."""
    final, interim = [], Counter[str]()
    for v in sorted(records, key=lambda r: r["ts"]):
        if not v.get("final", True):
            interim[f"{v['model']}:{v['outcome']}"] += 1
            continue
        ix = index.get(v["model"])
        final.append(
            {
                "id": v.get("verdict_id"),
                "model": v["model"],
                **{k: _round(v.get(k)) for k in VERDICT_FIELDS},
                "duration_s": round(v.get("duration_ms", 0) / 1000, 1),
                "at_record": None if ix is None else ix.at(int(v["ts"])),
                "ts": v["ts"],
            }
        )
    return {"final": final, "interim": dict(sorted(interim.items()))}


def deployments(
    records: Sequence[Mapping[str, Any]],
    index: Mapping[str, ScoredIndex],
    outcomes: Mapping[str, Sequence[Mapping[str, Any]]],
    predictions: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Every deployment published, with serving's outcome (``status``: applied, refused, pending; None
    when serving did not list it) and, from the prediction log, whether its effect shows (``effect``)."""
    by_id = {str(o.get("id")): o for listed in outcomes.values() for o in listed if o.get("id")}
    out = []
    for d in sorted(records, key=lambda r: r["ts"]):
        ix = index.get(d["model"])
        at = None if ix is None else ix.at(int(d["ts"]))
        outcome = by_id.get(str(d.get("id")), {})
        out.append(
            {
                "id": d.get("id"),
                "model": d["model"],
                "action": d["action"],
                "version": d.get("version"),
                "weight": d.get("weight"),
                "source": d.get("source"),
                "reason": d.get("reason"),
                "at_record": at,
                "status": outcome.get("status"),
                "status_reason": outcome.get("status_reason"),
                "effect": None if at is None or ix is None else effect(d, at, ix, predictions),
                "ts": d["ts"],
            }
        )
    return out


def effect(
    d: Mapping[str, Any], at: int, index: ScoredIndex, predictions: Sequence[Mapping[str, Any]]
) -> bool | None:
    """Whether the prediction log shows the deployment taken: a canary answering after a canary of it,
    no canary answering (after requests in flight) after a canary ended or a rollback, the version
    answering as champion after a promote; None for what the log cannot tell."""
    action, version = d["action"], d.get("version")
    mine = [p for p in predictions if p.get("model") == d["model"]]

    def after(arm: str, start_ms: int) -> list[Mapping[str, Any]]:
        return [p for p in mine if p.get("arm") == arm and int(p["ts"]) > start_ms]

    ts = int(d["ts"])
    if action == "canary" and d.get("weight"):
        return any(p["version"] == version for p in after("canary", ts))
    if (action == "canary" and not d.get("weight")) or action == "rollback":
        return not after("canary", ts + IN_FLIGHT_MS)
    if action == "promote":
        return any(p["version"] == version for p in after("champion", ts + IN_FLIGHT_MS))
    return None


def alerts(
    records: Sequence[Mapping[str, Any]],
    index: Mapping[str, ScoredIndex],
    drift_at: int | None,
    rate: float | None,
) -> list[dict[str, Any]]:
    """Every drift alert, placed where it was raised, with its delay after the injected change."""
    out = []
    for a in sorted(records, key=lambda r: r["ts"]):
        ix = index.get(a["model"])
        at = None if ix is None or not ix.ts else ix.at(int(a["ts"]))
        trigger = None if ix is None else ix.of_event.get(str(a.get("trigger_event_id") or ""))
        delay = None if at is None or drift_at is None else at - int(drift_at)
        out.append(
            {
                "model": a["model"],
                "kind": a.get("kind", "input"),
                "feature": a["feature"],
                "feature_type": a.get("feature_type"),
                "statistic": a["statistic"],
                "value": _round(float(a["value"])),
                "threshold": _round(a["threshold"]),
                "p_value": _round(a.get("p_value"), 6),
                "estimate_before": _round(a.get("estimate_before")),
                "estimate_after": _round(a.get("estimate_after")),
                "detector_delay_records": a.get("delay_records"),
                "model_version": a["version"],
                "arm": a.get("arm"),
                "at_record": at,
                "trigger_record": trigger,
                "delay_records": delay,
                "delay_s": None if delay is None or not rate else round(delay / rate, 1),
                "id": a.get("alert_id"),
            }
        )
    return out


def version_rows(
    versions: Sequence[Mapping[str, Any]], index: ScoredIndex, segments: Sequence[Sequence[int]]
) -> list[dict[str, Any]]:
    """Each version: where it was published, its metric, lineage, blessing, and when it answered."""
    first_served: dict[int, int] = {}
    for start, _, version in segments:
        first_served.setdefault(version, start)
    rows = []
    for v in versions:
        blessing = v.get("blessing")
        rows.append(
            {
                "version": v["version"],
                "at_record": index.at(int(v["created_ts"])),
                "metric": v.get("metric_value"),
                "trained_on": v.get("trained_on"),
                "parent_version": v.get("parent_version"),
                "trigger": v.get("trigger"),
                "blessing": None
                if blessing is None
                else {
                    k: _round(blessing.get(k))
                    for k in (
                        "blessed",
                        "reason",
                        "candidate_value",
                        "baseline_value",
                        "baseline_version",
                        "window_labels",
                    )
                },
                "served_from": first_served.get(v["version"]),
            }
        )
    return rows


def triggered(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("trigger") not in (None, "", SCHEDULE)]


def _final_verdict(report: Mapping[str, Any], model: str, version: int) -> Mapping[str, Any] | None:
    found = [v for v in report["verdicts"]["final"] if v["model"] == model and v["version"] == version]
    return found[0] if found else None


def verdict_deployment(report: Mapping[str, Any], verdict: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The deployment the judge published for ``verdict``: the one naming the verdict's id in its
    reason, else the judge's first for the model after it."""
    mine = [d for d in report["deployments"] if d["model"] == verdict["model"] and d.get("source") == "judge"]
    named = [d for d in mine if verdict.get("id") and verdict["id"] in str(d.get("reason") or "")]
    later = [d for d in mine if d["ts"] >= verdict["ts"]]
    return (named or later or [None])[0]


def applied(deployment: Mapping[str, Any]) -> bool:
    """Serving says it was applied; where serving did not list it, the prediction log shows it."""
    if deployment.get("status") is not None:
        return deployment["status"] == "applied"
    return bool(deployment.get("effect"))


def loop_problems(report: Mapping[str, Any], project: Project, section: Mapping[str, Any]) -> list[str]:
    """Why the loop did not close (see the module docstring)."""
    out = []
    canary = section.get("canary")
    if canary:
        model, version = canary.get("model"), canary.get("version")
        if canary.get("status") != 202:
            out.append(f"the canary of {model} v{version} was not accepted: {canary.get('error', canary)}")
        elif (verdict := _final_verdict(report, model, version)) is None:
            out.append(f"no final verdict on the canary of {model} v{version}")
        elif verdict.get("action"):
            deployment = verdict_deployment(report, verdict)
            if deployment is None:
                out.append(f"verdict {verdict['outcome']} on {model} v{version}: no deployment published")
            elif not applied(deployment):
                out.append(
                    f"verdict {verdict['outcome']} on {model} v{version}: its {deployment['action']} "
                    f"was not applied ({deployment.get('status')}: {deployment.get('status_reason')})"
                )
    drift_at = report.get("drift_injected_at")
    if drift_at is None:
        return out
    scored = [name for name, n in report["events_scored"].items() if n]
    after = [a for a in report["drift_alerts"] if a["delay_records"] is not None and a["delay_records"] >= 0]
    kinds = {a["kind"] for a in after}
    if "input" not in kinds:
        out.append("no input-drift alert after the injected change")
    if "concept" not in kinds and any(project.models[m].policy.drift.concept for m in scored):
        out.append("no concept-drift alert after the injected change")
    for name in scored:
        if not project.models[name].policy.retrain.on:
            continue
        model = report["models"][name]
        took_over = [
            v
            for v in triggered(model["versions"])
            if (v.get("blessing") or {}).get("blessed")
            and v["at_record"] >= drift_at
            and v["served_from"] is not None
        ]
        if not took_over:
            made = [
                f"v{v['version']} ({v['trigger']}: {v.get('blessing')})" for v in triggered(model["versions"])
            ]
            out.append(
                f"model {name}: no version triggered after the change was blessed and served"
                + (f" (triggered: {'; '.join(made)})" if made else " (none triggered)")
            )
    return out


def loop_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The loop's facts in a few lines: the canary's verdict and deployment, the first alert of each
    kind after the change, the triggered versions and whether one took over."""
    out: dict[str, Any] = {}
    final = report["verdicts"]["final"]
    if final:
        v = final[-1]
        d = verdict_deployment(report, v)
        out["canary"] = {
            **{
                k: v.get(k)
                for k in ("model", "version", "outcome", "rule", "estimate", "lower", "upper", "n")
            },
            "action": v.get("action"),
            "deployment": None
            if d is None
            else {k: d.get(k) for k in ("action", "version", "source", "status", "effect")},
        }
    first: dict[str, Any] = {}
    for a in report["drift_alerts"]:
        if a["delay_records"] is not None and a["delay_records"] >= 0:
            first.setdefault(
                a["kind"], {k: a[k] for k in ("model", "feature", "statistic", "delay_records", "delay_s")}
            )
    out["first_alerts"] = first
    out["triggered_versions"] = {
        name: [
            {k: v.get(k) for k in ("version", "trigger", "parent_version", "at_record", "served_from")}
            | {"blessed": (v.get("blessing") or {}).get("blessed")}
            for v in triggered(m["versions"])
        ]
        for name, m in report["models"].items()
        if triggered(m["versions"])
    }
    return out
