"""Online candidates: the window they are blessed on, and refreshes (a fresh learner warmed on it).

**The window.** Each lineage of the online trainer keeps the newest ``policy.retrain.window`` examples
it learnt (:class:`Seen`: inputs, target, event time, the version it went into and the lineage's
prediction made *before* learning it — progressive validation, as ``river.evaluate.progressive_val_score``).

**The comparison** (:func:`evaluate`) is prequential on both sides, on the same events of that window:

- the candidate's prediction for an event is the one its learner made before learning the event (for a
  refresh: the fresh learner's, during its warm-up on the window; otherwise the lineage's own);
- the champion's prediction for an event is what the champion said without having seen its label: for a
  champion published by the same lineage, the lineage's prediction before learning it for the events
  learnt into the champion or earlier (the champion is that learner then), and the champion's frozen
  artifact's score (what serving answers with it) for the events learnt after it was published; for a
  champion of another lineage or flavor, its frozen artifact's scores for every event (events it was
  trained on count in its favour: a known bias, towards keeping the champion).

Both metrics are the model's river metric over the events where both sides had a prediction (a learner
that has learnt nothing predicts nothing), and :func:`online_training.blessing.bless` decides. A
periodic version of the champion's own lineage therefore differs from the champion only on the events
since the champion: exactly where online learning could have helped or hurt.

**A refresh** (:func:`warm`), triggered by a drift alert: a fresh learner from the model's factory learns
the window's examples in order (its predictions before each are the candidate's), so it knows only the
recent concept. After a trainer restart the window is refilled from the newest examples of history
replayed through the lineage's view versions (their lineage predictions unknown: the champion is then
scored by its artifact on all of them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from online_training.blessing import ChampionScorer, compare
from online_training.learner import OnlineModel, build_learner
from schemas.definitions import Model, Project
from schemas.records import Blessing


@dataclass(frozen=True, slots=True)
class Seen:
    """One example learnt by a lineage (module docstring). ``version``: the version it went into (0:
    unknown, replayed after a restart); ``y_pred``: the lineage's prediction before learning it."""

    key: str
    x: dict[str, Any]
    y: Any
    ts: int | None
    version: int
    y_pred: Any = None


def evaluate(
    project: Project,
    model: Model,
    window: Sequence[Seen],
    candidate: Sequence[Any],
    champion: Mapping[str, Any] | None,
    scorer: ChampionScorer,
    *,
    same_lineage: bool,
) -> Blessing:
    """The blessing of a candidate whose predictions for ``window`` are ``candidate`` against
    ``champion`` (None: no champion); ``same_lineage``: the champion was published by the lineage whose
    predictions ``window`` holds (module docstring)."""
    ys = [s.y for s in window]
    if champion is None:
        return compare(model, ys, candidate)
    version = int(champion["version"])
    known = [same_lineage and 0 < s.version <= version for s in window]
    theirs: list[Any] | None = [s.y_pred if k else None for s, k in zip(window, known, strict=True)]
    todo = [i for i, k in enumerate(known) if not k]
    if todo:
        scored = scorer.predictions(project, model, champion, [window[i].x for i in todo])
        if scored is None:
            theirs = None
        else:
            for i, p in zip(todo, scored, strict=True):
                theirs[i] = p  # type: ignore[index]
    return compare(model, ys, candidate, theirs, version)


def warm(
    model: Model, window: Sequence[Seen], *, reference_size: int, profiled: Sequence[str]
) -> tuple[OnlineModel, list[Any]]:
    """A fresh learner of ``model`` that learnt ``window`` in order, and its predictions made before
    learning each example (TrainingError when the factory fails)."""
    online = OnlineModel(model, build_learner(model), reference_size=reference_size, profiled=profiled)
    return online, [online.learn(s.x, s.y) for s in window]
