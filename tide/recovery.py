"""The online metric as callers saw it, and how fast it recovered after an injected change.

Each scored event the caller received from the champion arm (the x axis of :mod:`tide.report`) is joined
with its label by event id; the model's task picks the metric: ROC AUC of the score (binary), mean
absolute error (regression), accuracy of the label (multiclass). The curve is that metric over sliding
windows of ``window`` labelled events, one point every ``step`` (at the index of the window's last
event).

Recovery, after a change at index ``drift_at``: the metric over the ``window`` labelled events before it
is the *pre-drift* level; the change is recovered from at the end of the first window lying wholly after
it whose metric, and the next window's, are back to ``fraction`` of that level (for an error metric:
within ``1 / fraction`` of it). ``records_to_recover`` counts scored events from the change to there
(None: not within the run). ``post_drift`` is the metric over every labelled event after the change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from online_training.evaluation import rolling_auc

METRICS = {"binary": "ROCAUC", "regression": "MAE", "multiclass": "Accuracy"}
BIGGER_IS_BETTER = {"ROCAUC": True, "Accuracy": True, "MAE": False}


@dataclass(frozen=True)
class Labelled:
    index: int  # the scored event's index
    y: Any  # the label
    score: float  # the prediction's score
    label: str | None = None  # a multiclass prediction's class


def metric_of(task: str, rows: Sequence[Labelled]) -> float | None:
    """The task's metric over ``rows``; None when it is undefined (no rows, one class only)."""
    if not rows:
        return None
    if task == "binary":
        return rolling_auc([bool(r.y) for r in rows], [r.score for r in rows])
    if task == "regression":
        return sum(abs(float(r.y) - r.score) for r in rows) / len(rows)
    return sum(str(r.y) == r.label for r in rows) / len(rows)


def joined(
    predictions: Iterable[Mapping[str, Any]], of_event: Mapping[str, int], labels: Mapping[str, Any]
) -> list[Labelled]:
    """The champion-arm predictions whose event has a label and an index, in index order."""
    rows = []
    for p in predictions:
        if p.get("arm", "champion") != "champion":
            continue
        event = str(p.get("event_id") or "")
        if event in labels and event in of_event:
            rows.append(Labelled(of_event[event], labels[event], float(p["score"]), p.get("label")))
    rows.sort(key=lambda r: r.index)
    return rows


def curve(task: str, rows: Sequence[Labelled], window: int, step: int) -> list[list[float]]:
    """``[[index, metric], ...]`` over sliding windows (see the module docstring)."""
    out = []
    for end in range(window, len(rows) + 1, max(step, 1)):
        value = metric_of(task, rows[end - window : end])
        if value is not None:
            out.append([rows[end - 1].index, round(value, 4)])
    return out


def _better_or_equal(value: float, target: float, bigger: bool) -> bool:
    return value >= target if bigger else value <= target


def recovery(
    task: str,
    rows: Sequence[Labelled],
    drift_at: int | None,
    *,
    window: int = 1000,
    step: int = 250,
    fraction: float = 0.9,
) -> dict[str, Any]:
    """The curve and, with a change at ``drift_at``, the recovery figures (module docstring)."""
    metric = METRICS.get(task, "metric")
    bigger = BIGGER_IS_BETTER.get(metric, True)
    out: dict[str, Any] = {
        "metric": metric,
        "bigger_is_better": bigger,
        "window": window,
        "labelled": len(rows),
        "curve": curve(task, rows, window, step),
    }
    if drift_at is None:
        return out
    before = [r for r in rows if r.index < drift_at][-window:]
    after = [r for r in rows if r.index >= drift_at]
    pre = metric_of(task, before)
    target = None if pre is None else (pre * fraction if bigger else pre / fraction)
    post_curve = curve(task, after, window, step)
    recovered_at = None
    if target is not None:
        hits = [_better_or_equal(v, target, bigger) for _, v in post_curve]
        for i, (index, _) in enumerate(post_curve):
            if hits[i] and (i + 1 == len(hits) or hits[i + 1]):
                recovered_at = int(index)
                break
    post = metric_of(task, after)
    out.update(
        {
            "drift_at": drift_at,
            "pre_drift": None if pre is None else round(pre, 4),
            "target": None if target is None else round(target, 4),
            "post_drift": None if post is None else round(post, 4),
            "worst_after_drift": None
            if not post_curve
            else (min if bigger else max)(v for _, v in post_curve),
            "recovered_at": recovered_at,
            "records_to_recover": None if recovered_at is None else recovered_at - drift_at,
        }
    )
    return out


def compare(on: Mapping[str, Any], off: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the metric recovered faster with the loop's reactions on than off: it recovered with
    them on, sooner than off did (or off never did), and the metric over everything after the change is
    better on."""
    bigger = bool(on.get("bigger_is_better", True))
    r_on, r_off = on.get("records_to_recover"), off.get("records_to_recover")
    p_on, p_off = on.get("post_drift"), off.get("post_drift")
    sooner = r_on is not None and (r_off is None or r_on < r_off)
    better = p_on is not None and p_off is not None and (p_on > p_off if bigger else p_on < p_off)
    return {
        "metric": on.get("metric"),
        "records_to_recover": {"on": r_on, "off": r_off},
        "post_drift": {"on": p_on, "off": p_off},
        "post_drift_gain": None
        if p_on is None or p_off is None
        else round((p_on - p_off) if bigger else (p_off - p_on), 4),
        "recovered_sooner": sooner,
        "better_after_drift": better,
        "faster": sooner and better,
    }
