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

**After a concept change** the window is cut at the change point. A concept alert (kind ``concept``)
estimates it: ``delay_records`` labels before the label of its ``trigger_event_id`` (the judge's count;
:func:`change_point` places it in the lineage's count of labels learnt, anchored at that label when the
lineage has learnt it, else at the newest label learnt). Warmed on the whole window, a fresh learner would
be compared with a champion whose predictions on the labels before the change are excellent, on labels
the new concept has not touched: it would lose to a champion that is wrong now. So the refresh
(:class:`Pending`) waits until the lineage has learnt ``min(window, trainer_refresh_min_labels)`` labels
since the change point (or ``trainer_refresh_max_wait_s`` passed with at least one), then a fresh
learner is warmed on the labels since the change point (at most ``window``) and blessed against the
champion on those same labels, prequentially on both sides as above. The judge counts only the
champion's labels, the lineage every served one: the estimate errs towards fewer labels, all after the
change.

An input or output drift alert, and a concept alert without an estimate (``delay_records`` null), carry
no change point among the labels: they refresh at once on the whole window (a drifted input may leave
the concept as it was; the window holds what is known of the present).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

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


def change_point(alert: Mapping[str, Any], window: Sequence[Seen], learnt: int) -> int | None:
    """The lineage's count of labels learnt at the change point ``alert`` estimates (module docstring):
    ``window`` the lineage's newest examples (the last one its ``learnt``-th label). None when the alert
    estimates no change point among the labels (not a concept alert, or no ``delay_records``)."""
    delay = alert.get("delay_records")
    if alert.get("kind") != "concept" or delay is None:
        return None
    anchor = learnt
    event = alert.get("trigger_event_id")
    if event is not None:
        for back, seen in enumerate(reversed(window)):
            if seen.key == str(event):
                anchor = learnt - back
                break
    return max(anchor - int(delay), 0)


@dataclass(frozen=True, slots=True)
class Pending:
    """A refresh waiting for labels of the new concept (module docstring): the alert, the lineage whose
    count ``start`` is (its labels learnt at the change point) and when it was noted (ms, wall clock)."""

    alert: dict[str, Any]
    lineage: str
    start: int
    noted_ms: int

    def since(self, lineage: str, learnt: int) -> int | None:
        """Labels the lineage ``lineage`` learnt since the change point, having learnt ``learnt`` in all;
        None when another lineage has taken over (its count is not this one's)."""
        return max(learnt - self.start, 0) if lineage == self.lineage else None

    @staticmethod
    def dumps(pending: Mapping[str, Pending]) -> bytes:
        """Pending refreshes by model, as JSON (a checkpointed step's state)."""
        return orjson.dumps(
            {m: [p.alert, p.lineage, p.start, p.noted_ms] for m, p in sorted(pending.items())}
        )

    @staticmethod
    def loads(blob: bytes) -> dict[str, Pending]:
        return {
            m: Pending(dict(a), str(ln), int(s), int(t)) for m, (a, ln, s, t) in orjson.loads(blob).items()
        }
