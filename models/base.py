"""The model contract: what every runtime answers, whatever its artifact format or task.

A runtime scores input maps (request fields and online features by input name, as
:class:`models.inputs.ModelInputs` assembles them) and answers one :class:`Output` each:

- ``binary``: ``score`` is the probability of the positive class (``True``);
- ``regression``: ``score`` is the predicted value;
- ``multiclass``: ``probabilities`` holds every class's probability (classes as strings), ``label`` is
  the most probable class and ``score`` its probability.

Runtimes live beside this module, one per artifact format (:mod:`models.river_runtime`,
:mod:`models.onnx_runtime`); :mod:`models.runtime` loads a ``model_version`` record into one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Output:
    """One answer of a model (see the module docstring for what each task puts in it)."""

    score: float
    label: str | None = None
    probabilities: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "label": self.label, "probabilities": self.probabilities}


class ModelRuntime(Protocol):
    """A loaded model: scores input maps."""

    provider: str  # where it runs: "python" (river), or the onnxruntime execution provider
    task: str  # binary, multiclass or regression

    def predict_one(self, x: Mapping[str, Any]) -> Output:
        """The answer for one input map."""
        ...

    def predict_many(self, xs: Sequence[Mapping[str, Any]]) -> list[Output]:
        """:meth:`predict_one` of each, in order (one model call where the runtime can batch)."""
        ...


def classify(probabilities: Mapping[Any, float], classes: Sequence[str] = ()) -> Output:
    """A multiclass answer from class probabilities; ``classes`` (when given) are all reported, the
    missing ones at 0. The label is the most probable class (the first listed of equals); no label and
    score 0 when there are no probabilities at all (a model that has learnt nothing yet)."""
    probs = {str(k): float(v) for k, v in probabilities.items()}
    if classes:
        probs = {c: probs.get(c, 0.0) for c in classes} | probs
    if not probs:
        return Output(0.0, None, {})
    label = max(probs, key=probs.__getitem__)
    return Output(probs[label], label, probs)
