"""One model's online learner: built from its factory, learning progressively, dumped as a version.

:func:`build_learner` imports the model's ``learner`` factory (``"module:factory"``, the project's code on
the path) and checks that what it returns has river's verbs. :class:`OnlineModel` wraps the learner with
the model's declared metric and counters and learns the way ``river.evaluate.progressive_val_score``
does: predict, feed the metric, then learn. Given the same examples in the same order, its predictions
are those of bare river with the same factory, to the bit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from infra.errors import TrainingError
from infra.imports import import_object
from models.artifacts import dump_river
from models.profile import profile_from_columns
from online_training.evaluation import build_metric, predictor, scorer
from schemas.definitions import Model


@runtime_checkable
class Learner(Protocol):
    """River's verbs (``learn_one`` returns nothing since river 0.21)."""

    def learn_one(self, x: dict[str, Any], y: Any) -> None: ...

    def predict_one(self, x: dict[str, Any]) -> Any: ...


def build_learner(model: Model) -> Any:
    """A new learner from ``model``'s factory; :class:`TrainingError` naming the model when the factory
    cannot be imported, fails, or returns an object without river's verbs for the task."""
    where = f"model {model.name!r}, field 'learner'"
    if model.learner is None:
        raise TrainingError(f"model {model.name!r} declares no learner")
    factory = import_object(model.learner, where)
    try:
        learner = factory()
    except Exception as exc:
        raise TrainingError(f"{where}: {model.learner}() raised {type(exc).__name__}: {exc}") from exc
    missing = [] if isinstance(learner, Learner) else ["learn_one", "predict_one"]
    if model.task != "regression" and not callable(getattr(learner, "predict_proba_one", None)):
        missing.append("predict_proba_one")
    if missing:
        raise TrainingError(
            f"{where}: {model.learner}() returned {type(learner).__name__}, which has no "
            f"{', '.join(missing)} (a river estimator is expected)"
        )
    return learner


SCORED_REFERENCE = 200  # inputs re-scored at each publish for the reference's score histogram


class OnlineModel:
    """A model's learner, metric and counters (see the module docstring).

    ``version`` is the newest version published of the model (any flavor: the next one is
    ``version + 1``); ``trained_on`` the labels learnt since the learner was created; ``profiled`` the
    monitored inputs with numeric values (default: ``model.monitor``), histogrammed in the reference.
    """

    def __init__(
        self,
        model: Model,
        learner: Any,
        *,
        metric: Any = None,
        version: int = 0,
        trained_on: int = 0,
        classes: tuple[str, ...] = (),
        reference_size: int = 2000,
        profiled: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.name = model.name
        self.task = model.task
        self.learner = learner
        self.metric = metric if metric is not None else build_metric(model)
        if hasattr(self.metric, "works_with") and not self.metric.works_with(learner):
            raise TrainingError(
                f"model {model.name!r}: metric {model.metric_name} does not work with "
                f"{type(learner).__name__}"
            )
        self.profiled = tuple(model.monitor if profiled is None else profiled)
        self.version = version
        self.trained_on = trained_on
        self.since_publish = 0
        self.classes: set[str] = set(classes)
        self._predict = predictor(self.task, learner, self.metric)
        self._update = self.metric.update
        self._learn = learner.learn_one
        self._score = scorer(self.task)
        # The newest examples' profiled inputs, raw (columns): each version's reference profile.
        self.columns: dict[str, deque[Any]] = {m: deque(maxlen=reference_size) for m in self.profiled}
        # The newest inputs, scored again at publish by the learner being published: live scores come
        # from that version, and a young model's scores before learning drift away from its own.
        self.recent: deque[dict[str, Any]] = deque(maxlen=min(reference_size, SCORED_REFERENCE))
        self._appends = [(m, col.append) for m, col in self.columns.items()]

    def learn(self, x: dict[str, Any], y: Any) -> Any:
        """Predict ``x``, feed the metric, learn ``(x, y)`` (``y`` already of the task's type); returns the
        prediction made before learning, as the metric was fed it."""
        y_pred = self._predict(x)
        if y_pred is not None and y_pred != {}:
            self._update(y_true=y, y_pred=y_pred)
        self._learn(x, y)
        self.trained_on += 1
        self.since_publish += 1
        self.recent.append(x)
        for m, append in self._appends:
            append(x.get(m))
        if self.task == "multiclass":
            self.classes.add(str(y))
        return y_pred

    def metric_value(self) -> float | None:
        """The progressive metric; None before anything was learnt with a prediction to score."""
        if self.trained_on == 0:
            return None
        value = self.metric.get()
        return None if value is None else float(value)

    def dump(self) -> bytes:
        return dump_river(self.learner)[0]

    def profile(self) -> dict[str, Any] | None:
        """The reference profile of the newest examples: their monitored inputs, and the scores the
        learner being published gives the newest of them (what serving will log with this version)."""
        if not self.recent:
            return None
        predictions = [self._predict(x) for x in self.recent]
        scores = [self._score(p) for p in predictions]
        labels = [_label(p) for p in predictions] if self.task == "multiclass" else None
        return profile_from_columns(
            {m: list(col) for m, col in self.columns.items()},
            scores,
            labels=labels,
            size=max([len(self.recent), *(len(col) for col in self.columns.values())]),
        )

    def sorted_classes(self) -> tuple[str, ...]:
        return tuple(sorted(self.classes)) if self.task == "multiclass" else ()


def _label(y_pred: Any) -> str:
    """The class a multiclass prediction names (the most probable of a probability map)."""
    if isinstance(y_pred, Mapping):
        return str(max(y_pred, key=y_pred.__getitem__)) if y_pred else ""
    return str(y_pred)
