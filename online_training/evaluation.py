"""Evaluating models: the declared river metric, what it is fed per task, and a rank ROC AUC.

A model declares its metric by river class name (``"ROCAUC"``, ``"MAE"``, ``"Accuracy"``) or import path
(``"module:Class"``, a class with river's ``update(y_true, y_pred)`` and ``get()``). As in
``river.evaluate.progressive_val_score``, a classifier's metric is fed class probabilities
(``predict_proba_one``) unless the metric ``requires_labels`` (then ``predict_one``); a regressor's
``predict_one``. An empty prediction (``None`` or ``{}``, a learner that has learnt nothing) is not fed.

:func:`metric_value` is the metric over a whole window at once (a blessing's): river's own ``ROCAUC``
(its thresholds: the same value), ``MAE``, ``MSE`` and ``RMSE`` (the same to rounding) are computed
over arrays rather than fed pair by pair to a fresh instance, as any other metric is (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from river import metrics
from scipy import integrate

from infra.errors import TrainingError
from infra.imports import import_object
from schemas.definitions import Model


def build_metric(model: Model) -> Any:
    """A fresh instance of ``model``'s declared metric; :class:`TrainingError` naming the model if it is
    not a river metric class (or a class with ``update`` and ``get``)."""
    name = model.metric_name
    where = f"model {model.name!r}, field 'metric'"
    cls = import_object(name, where) if ":" in name else getattr(metrics, name, None)
    if not isinstance(cls, type):
        raise TrainingError(f"{where}: {name!r} is not a river metric class (e.g. ROCAUC, MAE, Accuracy)")
    try:
        metric = cls()
    except Exception as exc:
        raise TrainingError(f"{where}: {name}() raised {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(metric, "update", None)) or not callable(getattr(metric, "get", None)):
        raise TrainingError(f"{where}: {name} has no update(y_true, y_pred) and get()")
    return metric


def predictor(task: str, learner: Any, metric: Any) -> Any:
    """The prediction the metric is fed (see the module docstring): a bound method of ``learner``."""
    proba = getattr(learner, "predict_proba_one", None)
    if task != "regression" and callable(proba) and not getattr(metric, "requires_labels", False):
        return proba
    return learner.predict_one


def score_of(task: str, y_pred: Any) -> float:
    """The one number a prediction is profiled as, as serving's ``score``: the probability of ``True``
    (binary), the value (regression), the probability of the most probable class (multiclass).
    A bare label (from ``predict_one``) counts 1.0 (0.0 for a binary ``False``)."""
    if isinstance(y_pred, Mapping):
        if not y_pred:
            return 0.0
        if task == "binary":
            return float(y_pred.get(True, 0.0))
        return float(max(y_pred.values()))
    if y_pred is None:
        return 0.0
    if task == "regression":
        return float(y_pred)
    if task == "binary":
        return 1.0 if y_pred else 0.0
    return 1.0


def scorer(task: str) -> Callable[[Any], float]:
    """:func:`score_of` for ``task``, with a fast path for the common prediction of each task."""
    if task == "binary":

        def binary(y_pred: Any) -> float:
            if type(y_pred) is dict:
                return float(y_pred.get(True, 0.0))
            return score_of(task, y_pred)

        return binary
    if task == "regression":

        def regression(y_pred: Any) -> float:
            return float(y_pred) if type(y_pred) is float else score_of(task, y_pred)

        return regression
    return functools.partial(score_of, task)


def rolling_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """ROC AUC by ranks (ties averaged); None while one class is absent."""
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    s = np.asarray(scores, dtype=float)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def metric_value(metric: Any, ys: Sequence[Any], preds: Sequence[Any]) -> float | None:
    """The value a fresh copy of ``metric`` (unfed: only its type and settings are used) takes when fed
    every ``(y, y_pred)`` pair (empty predictions skipped); None when nothing was fed or it has no value.
    """
    pairs = [(y, p) for y, p in zip(ys, preds, strict=True) if p is not None and p != {}]
    if not pairs:
        return None
    kind = type(metric)
    if kind is metrics.ROCAUC and type(metric.pos_val) is bool:
        return _roc_auc(metric, pairs)
    if kind in (metrics.MAE, metrics.MSE, metrics.RMSE) and all(type(p) is float for _, p in pairs):
        errors = np.array([float(y) for y, _ in pairs]) - np.array([p for _, p in pairs])
        if kind is metrics.MAE:
            return float(np.mean(np.abs(errors)))
        mse = float(np.mean(errors**2))
        return mse if kind is metrics.MSE else mse**0.5
    fresh = metric.clone() if callable(getattr(metric, "clone", None)) else kind()
    for y, p in pairs:
        fresh.update(y_true=y, y_pred=p)
    value = fresh.get()
    return None if value is None else float(value)


def _roc_auc(metric: Any, pairs: Sequence[tuple[Any, Any]]) -> float:
    """River's ``ROCAUC.get()`` after feeding ``pairs`` (its thresholds and trapezoid), over arrays."""
    y = np.array([yt == metric.pos_val for yt, _ in pairs], dtype=bool)
    p = np.array([yp.get(True, 0.0) if isinstance(yp, dict) else yp for _, yp in pairs], dtype=float)
    positives, negatives = int(y.sum()), int((~y).sum())
    tprs, fprs = [], []
    for t in metric.thresholds:
        above = p > t
        tp = float(np.count_nonzero(above & y))
        fp = float(np.count_nonzero(above & ~y))
        tprs.append(tp / positives if positives else 0.0)
        fprs.append(fp / negatives if negatives else 0.0)
    return float(-integrate.trapezoid(x=fprs, y=tprs))
