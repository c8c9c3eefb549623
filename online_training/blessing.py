"""Blessing a candidate version against the champion (TFX Evaluator's rule) and finding the champion.

The rule (:func:`bless`), with the model's :class:`schemas.policy.Retrain` policy, on one recent window
of labelled examples that both were measured on:

1. a candidate whose metric could not be measured is blessed only when nothing asks for a value (no
   ``min_value``) and there is no champion to beat (a model's first, untrained version: serving can
   start);
2. **value threshold**: with ``min_value`` set, the candidate's metric must reach it (``>=`` when bigger
   is better, ``<=`` otherwise);
3. **change threshold**: with a champion measured on the same window, the candidate may be worse than
   it by at most ``max_regression`` (in the metric's units, in the direction river's
   ``bigger_is_better`` says is worse);
4. otherwise blessed. A champion that could not be measured on the window (an artifact that does not
   load, or no example it had not learnt) leaves only the value threshold, and the reason says so.

The **champion** of a model is its newest *blessed* version (a record without a blessing counts as
blessed, as versions published before blessing existed): what serving's ``follow`` serves, whatever the
flavor. :class:`Champions` keeps it per model from the ``model_version`` records seen.

:class:`ChampionScorer` scores inputs with a champion's artifact through :func:`models.runtime.load_model`
(the serving path, any flavor), and :func:`as_prediction` turns its answer into what the model's river
metric is fed, the way a learner's prediction is (:mod:`online_training.evaluation`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from models.base import Output
from models.inputs import ModelInputs
from models.runtime import LoadedModel, load_model
from online_training.evaluation import build_metric, metric_value
from schemas.definitions import Model, Project
from schemas.policy import Retrain
from schemas.records import Blessing

log = logging.getLogger(__name__)


def is_blessed(record: Mapping[str, Any]) -> bool:
    """Whether a ``model_version`` record may serve as champion (no blessing: yes)."""
    blessing = record.get("blessing")
    return blessing is None or bool(blessing.get("blessed"))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def bless(
    policy: Retrain,
    metric: str,
    *,
    bigger_is_better: bool,
    candidate: float | None,
    baseline: float | None = None,
    baseline_version: int | None = None,
    window_labels: int = 0,
) -> Blessing:
    """The blessing of a candidate measured ``candidate`` on a window of ``window_labels`` labelled
    examples where the champion ``baseline_version`` (None: no champion) measured ``baseline`` (see the
    module docstring)."""

    def verdict(blessed: bool, reason: str) -> Blessing:
        return {
            "blessed": blessed,
            "reason": reason,
            "metric": metric,
            "candidate_value": candidate,
            "baseline_value": baseline,
            "baseline_version": baseline_version,
            "window_labels": int(window_labels),
        }

    sign = 1.0 if bigger_is_better else -1.0
    at_least = ">=" if bigger_is_better else "<="
    if candidate is None:
        if policy.min_value is None and baseline_version is None:
            return verdict(True, "no champion and no min_value: nothing to beat")
        why = f"{metric} of the candidate could not be measured on the window ({window_labels} labels)"
        return verdict(False, why)
    if policy.min_value is not None and sign * (candidate - policy.min_value) < 0:
        return verdict(
            False,
            f"value threshold: {metric} {_fmt(candidate)} is not {at_least} min_value {policy.min_value}",
        )
    value_ok = f"value threshold met ({metric} {_fmt(candidate)} {at_least} {policy.min_value})"
    if baseline_version is None:
        if policy.min_value is None:
            return verdict(True, f"no champion; {metric} {_fmt(candidate)} (no min_value)")
        return verdict(True, f"no champion; {value_ok}")
    if baseline is None:
        return verdict(
            True,
            f"champion v{baseline_version} could not be measured on the window; "
            + (value_ok if policy.min_value is not None else "no min_value"),
        )
    regression = sign * (baseline - candidate)  # > 0: the candidate is worse
    if regression > policy.max_regression:
        return verdict(
            False,
            f"change threshold: {metric} {_fmt(candidate)} is worse than champion v{baseline_version}'s "
            f"{_fmt(baseline)} by {regression:.4g} > max_regression {policy.max_regression}",
        )
    return verdict(
        True,
        f"{metric} {_fmt(candidate)} vs champion v{baseline_version}'s {_fmt(baseline)} on "
        f"{window_labels} labels: within max_regression {policy.max_regression}",
    )


def _has(y_pred: Any) -> bool:
    return y_pred is not None and y_pred != {}


def compare(
    model: Model,
    ys: Sequence[Any],
    candidate: Sequence[Any],
    baseline: Sequence[Any] | None = None,
    baseline_version: int | None = None,
) -> Blessing:
    """:func:`bless` with the model's policy and metric, both metrics taken over the examples where
    both sides predicted something (``baseline``: the champion ``baseline_version``'s predictions, None
    when there is no champion or it could not be scored)."""
    measured = baseline is not None and baseline_version is not None
    both = [
        i
        for i in range(len(ys))
        if _has(candidate[i]) and (not measured or _has(baseline[i]))  # type: ignore[index]
    ]
    metric = build_metric(model)
    window = [ys[i] for i in both]
    candidate_value = metric_value(metric, window, [candidate[i] for i in both])
    baseline_value = None
    if baseline is not None:
        baseline_value = metric_value(metric, window, [baseline[i] for i in both])
    return bless(
        model.policy.retrain,
        model.metric_name,
        bigger_is_better=bool(getattr(metric, "bigger_is_better", True)),
        candidate=candidate_value,
        baseline=baseline_value,
        baseline_version=baseline_version,
        window_labels=len(both),
    )


def as_prediction(task: str, output: Output, labels_only: bool = False) -> Any:
    """What a metric is fed for a runtime's answer: class probabilities, or the label when the metric
    ``requires_labels`` (``labels_only``); a regressor's value."""
    if task == "regression":
        return output.score
    if task == "binary":
        return output.score >= 0.5 if labels_only else {True: output.score, False: 1.0 - output.score}
    if labels_only:
        return output.label
    return dict(output.probabilities or {})


class Champions:
    """The newest blessed version of each model, from the records seen (any order)."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def seen(self, record: Mapping[str, Any]) -> None:
        name = str(record["model"])
        current = self.records.get(name)
        if is_blessed(record) and (current is None or int(record["version"]) > current["version"]):
            self.records[name] = dict(record)

    def of(self, model: str) -> dict[str, Any] | None:
        return self.records.get(model)

    def version(self, model: str) -> int | None:
        found = self.records.get(model)
        return None if found is None else int(found["version"])


class ChampionScorer:
    """Scores inputs with a version's artifact (loaded once per model and version, the newest kept)."""

    def __init__(self) -> None:
        self._loaded: dict[str, LoadedModel] = {}

    def predictions(
        self, project: Project, model: Model, record: Mapping[str, Any], xs: Sequence[Mapping[str, Any]]
    ) -> list[Any] | None:
        """The metric inputs of ``record``'s answers for ``xs``; None when it cannot be loaded or fails
        on them (logged)."""
        loaded = self._loaded.get(model.name)
        if loaded is None or loaded.version != int(record["version"]):
            try:
                views = {str(k): int(v) for k, v in (record.get("view_versions") or {}).items()}
                loaded = load_model(record, ModelInputs.of(project, model, views or None))
            except Exception as exc:  # a champion that will not load is no baseline (ModelLoadError, ...)
                log.warning("model %s: champion v%s not scored: %s", model.name, record["version"], exc)
                return None
            self._loaded[model.name] = loaded
        labels_only = bool(getattr(build_metric(model), "requires_labels", False))
        try:
            outputs = loaded.runtime.predict_many(list(xs))
            return [as_prediction(model.task, out, labels_only) for out in outputs]
        except Exception as exc:
            log.warning("model %s: champion v%s failed on the window: %s", model.name, record["version"], exc)
            return None
