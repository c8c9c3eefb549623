"""The ``river`` flavor: a pickled river learner (or anything with river's verbs), scored per task.

- ``binary``: ``predict_proba_one(x)`` and the probability of ``True`` (a label of 1 counts as True);
- ``multiclass``: ``predict_proba_one(x)``, every class's probability and the most probable class;
- ``regression``: ``predict_one(x)``, the value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from infra.errors import ModelLoadError
from models.artifacts import load_river
from models.base import ModelRuntime, Output, classify
from models.inputs import ModelInputs

TASKS = ("binary", "multiclass", "regression")


class RiverRuntime:
    """A river learner answering for one task (see the module docstring)."""

    provider = "python"

    def __init__(self, model: Any, task: str = "binary", classes: Sequence[str] = ()) -> None:
        if task not in TASKS:
            raise ModelLoadError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
        verb = "predict_one" if task == "regression" else "predict_proba_one"
        if not callable(getattr(model, verb, None)):
            raise ModelLoadError(f"a {task} model needs {verb}(x); {type(model).__name__} has none")
        self.model = model
        self.task = task
        self.classes = tuple(classes)
        self._predict = getattr(self, f"_{task}")

    def _binary(self, x: Mapping[str, Any]) -> Output:
        return Output(float(self.model.predict_proba_one(x).get(True, 0.0)))

    def _multiclass(self, x: Mapping[str, Any]) -> Output:
        return classify(self.model.predict_proba_one(x), self.classes)

    def _regression(self, x: Mapping[str, Any]) -> Output:
        value = self.model.predict_one(x)
        return Output(float(value) if value is not None else 0.0)

    def predict_one(self, x: Mapping[str, Any]) -> Output:
        return self._predict(x)

    def predict_many(self, xs: Sequence[Mapping[str, Any]]) -> list[Output]:
        predict = self._predict
        return [predict(x) for x in xs]


def build_river(record: Mapping[str, Any], inputs: ModelInputs) -> ModelRuntime:
    """The runtime of a ``river`` record (artifact fetched); its task is the model's."""
    learner = load_river(bytes(record["artifact"]), str(record["sha256"]))
    return RiverRuntime(learner, inputs.task, record.get("classes") or ())
