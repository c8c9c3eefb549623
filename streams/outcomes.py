"""Labels joined with predictions, and the loss of each labelled prediction.

**The join.** A label joins the predictions of its event: the labels source's ``key`` field, as a string
(``str(value)``, as the trainer joins them), equals the prediction's ``event_id``. Either may come
first. One :class:`Joins` per model keeps, by event id, the event's predictions (one per arm: the champion
or canary that answered, the shadow that scored beside it) and its label, for ``ttl_ms`` (the labels'
``max_delay``) of the other side's stream time (a label waits until the predictions read have passed its
record's time by the TTL, and the other way round; the predictions' time is that of every model's
predictions read, :meth:`Joins.predictions_at`, since they share one topic), at most ``max_pending``
events. While an event is
held, each prediction is joined once, whichever of prediction and label comes last; a second label for
it is a duplicate. A label that never found a prediction is returned by :meth:`Joins.expire` so the
judge can dead-letter it (a label of an unknown event).

**The loss** (:func:`loss`), per task: binary log loss of the ``score`` (the probability of ``True``,
clipped to ``[EPS, 1 - EPS]``); regression squared error of the ``score``; multiclass log loss of the
probability given to the true class (clipped alike) when the prediction carries ``probabilities``, else
0-1 loss of its ``label``. The concept monitor watches a regressor's absolute error instead
(:func:`concept_signal`). A prediction whose output cannot be scored (non-finite, a probability outside
``[0, 1]``, a multiclass one without a label) is an *error*: it counts against the error-rate guardrail
and has no loss (:func:`output_error`).

**Targets** (:func:`target`) are checked against the task before anything is joined: binary takes a
boolean or 0/1, regression a finite number, multiclass a string, integer or boolean (as a string);
anything else is a label of the wrong type.

**Predictions before their version** (:class:`Unpublished`): a prediction read before its version's
record on the models topic waits, per model, until the version comes or a bound passes.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.errors import StreamError

EPS = 1e-6  # probability clip: one confident mistake costs at most -log(EPS) ~ 13.8 nats
LOG_LOSS, SQUARED_ERROR, ZERO_ONE = "log_loss", "squared_error", "zero_one"


def target(task: str, raw: Any) -> bool | float | str:
    """The label's target as ``task`` scores it; raises :class:`StreamError` for a value of the wrong
    type (the message starts with ``wrong_type``)."""
    if task == "binary":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int | float) and raw in (0, 1):
            return bool(raw)
    elif task == "regression":
        if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
            return float(raw)
    elif task == "multiclass":
        if isinstance(raw, bool):
            return "true" if raw else "false"  # as JSON and the learners' class keys write it
        if isinstance(raw, str | int):
            return str(raw)
    raise StreamError(f"wrong_type: a {task} label cannot be {raw!r} ({type(raw).__name__})")


def output_error(task: str, prediction: Mapping[str, Any]) -> str | None:
    """Why the prediction's output cannot be scored, or None when it can."""
    score = prediction.get("score")
    if not isinstance(score, int | float) or not math.isfinite(score):
        return f"score {score!r} is not a finite number"
    if task == "binary" and not 0.0 <= score <= 1.0:
        return f"binary score {score!r} is not a probability"
    if task == "multiclass":
        probs = prediction.get("probabilities")
        if probs:
            bad = [k for k, p in probs.items() if not (math.isfinite(p) and 0.0 <= p <= 1.0)]
            if bad or abs(sum(probs.values()) - 1.0) > 1e-3:
                return "class probabilities are not a distribution"
        elif prediction.get("label") is None:
            return "a multiclass prediction without a label or probabilities"
    return None


def metric_of(task: str, prediction: Mapping[str, Any]) -> str:
    if task == "regression":
        return SQUARED_ERROR
    if task == "multiclass" and not prediction.get("probabilities"):
        return ZERO_ONE
    return LOG_LOSS


def loss(task: str, prediction: Mapping[str, Any], y: bool | float | str) -> float:
    """The per-event loss of a scorable prediction (:func:`output_error` is None) given target ``y``."""
    if task == "binary":
        p = min(max(float(prediction["score"]), EPS), 1.0 - EPS)
        return -math.log(p if y else 1.0 - p)
    if task == "regression":
        return (float(prediction["score"]) - float(y)) ** 2
    probs = prediction.get("probabilities")
    if probs:
        return -math.log(min(max(float(probs.get(str(y), 0.0)), EPS), 1.0 - EPS))
    return 0.0 if str(prediction.get("label")) == str(y) else 1.0


def concept_signal(task: str, loss_value: float) -> float:
    """What the concept monitor (:mod:`streams.concept`) watches of an event's loss: the loss itself,
    except for a regressor its absolute error (the square root of its squared error): squared errors are
    too heavy-tailed for the detectors to hold their false-alarm rate, absolute errors are not."""
    return math.sqrt(loss_value) if task == "regression" else loss_value


@dataclass(slots=True)
class Scored:
    """What the judge keeps of one prediction: enough to compute its loss when the label comes."""

    arm: str
    version: int
    score: float
    label: str | None
    probabilities: dict[str, float] | None
    error: bool

    @classmethod
    def of(cls, task: str, prediction: Mapping[str, Any]) -> Scored:
        return cls(
            str(prediction["arm"]),
            int(prediction["version"]),
            float(prediction["score"]),
            prediction.get("label"),
            prediction.get("probabilities"),
            output_error(task, prediction) is not None,
        )

    def view(self) -> dict[str, Any]:
        return {"score": self.score, "label": self.label, "probabilities": self.probabilities}


@dataclass(slots=True)
class LabelSeen:
    """A label waiting in the join, with where it came from (a late dead letter needs it)."""

    y: bool | float | str
    raw: dict[str, Any]
    key: bytes | None
    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class Event:
    """One event in the join: its predictions by arm, its label, which arms were joined."""

    first_ms: int
    predictions: dict[str, Scored] = field(default_factory=dict)
    label: LabelSeen | None = None
    joined: set[str] = field(default_factory=set)
    losses: dict[str, float] = field(default_factory=dict)
    paired: bool = False  # a shadow's loss and the champion's were compared


@dataclass(frozen=True)
class Joined:
    """A labelled prediction: its event, arm, version and loss (None for an erroneous output)."""

    event_id: str
    arm: str
    version: int
    loss: float | None
    metric: str
    event: Event


class Joins:
    """The label x prediction join of one model (module docstring).

    Events are held in two queues by first sight: ``open`` (waiting for a label or a prediction) and
    ``done`` (labelled and joined; kept to catch duplicates and a late shadow). Beyond ``max_pending``
    the oldest done events go first, then the oldest open ones (their joins are lost: counted).
    """

    def __init__(self, task: str, ttl_ms: int, max_pending: int) -> None:
        self.task = task
        self.ttl_ms = ttl_ms
        self.max_pending = max_pending
        self.open: OrderedDict[str, Event] = OrderedDict()
        self.done: OrderedDict[str, Event] = OrderedDict()
        # Each side's stream time: a label waits for predictions until the predictions read have passed
        # its time by the TTL, and the other way round (a consumer may read one topic far ahead).
        self.prediction_clock = 0
        self.label_clock = 0

    def __len__(self) -> int:
        return len(self.open) + len(self.done)

    def waiting(self) -> tuple[int, int]:
        """(labels that no prediction has met yet, events with predictions and no label yet)."""
        labels = sum(1 for e in self.open.values() if e.label is not None)
        return labels, len(self.open) - labels

    def _event(self, event_id: str, now_ms: int) -> Event:
        event = self.open.get(event_id) or self.done.get(event_id)
        if event is None:
            event = self.open[event_id] = Event(now_ms)
        return event

    def predictions_at(self, now_ms: int) -> None:
        """A prediction (of any model) was read with record time ``now_ms``: a label that no prediction
        met expires once predictions have passed its time by the TTL, whether or not this model's
        predictions go on (a model no longer scored does not hold its labels)."""
        self.prediction_clock = max(self.prediction_clock, now_ms)

    def prediction(self, event_id: str, scored: Scored, now_ms: int) -> list[Joined]:
        """Hold a prediction (``now_ms``: its record's time); return it joined when its label is there."""
        self.prediction_clock = max(self.prediction_clock, now_ms)
        event = self._event(event_id, now_ms)
        event.predictions[scored.arm] = scored
        return self._join(event_id, event)

    def label(self, event_id: str, label: LabelSeen, now_ms: int) -> list[Joined]:
        """Hold a label; return its event's predictions joined. Raises :class:`StreamError`
        (``duplicate_label``) when the event already has one. ``now_ms``: the label record's time."""
        self.label_clock = max(self.label_clock, now_ms)
        event = self._event(event_id, now_ms)
        if event.label is not None:
            raise StreamError(f"duplicate_label: event {event_id!r} already has a label")
        event.label = label
        return self._join(event_id, event)

    def _join(self, event_id: str, event: Event) -> list[Joined]:
        if event.label is None:
            return []
        out = []
        for arm, scored in event.predictions.items():
            if arm in event.joined:
                continue
            event.joined.add(arm)
            value = None if scored.error else loss(self.task, scored.view(), event.label.y)
            if value is not None:
                event.losses[arm] = value
            metric = metric_of(self.task, scored.view())
            out.append(Joined(event_id, arm, scored.version, value, metric, event))
        if out and event_id in self.open:
            self.done[event_id] = self.open.pop(event_id)
            event.label.raw = {}  # joined: the label's body is not needed for a dead letter any more
        return out

    def _expired(self, event: Event) -> bool:
        if event.label is None:
            clock = self.label_clock
        elif not event.predictions:
            clock = self.prediction_clock
        else:
            clock = min(self.label_clock, self.prediction_clock)
        return clock - event.first_ms > self.ttl_ms

    def drop_labels(self, until_ms: int) -> int:
        """Drop the labels held without a prediction whose time is at most ``until_ms``; return how many
        (a model not served: no prediction of it will meet them)."""
        gone = [
            k
            for k, e in self.open.items()
            if e.label is not None and not e.predictions and e.first_ms <= until_ms
        ]
        for event_id in gone:
            del self.open[event_id]
        return len(gone)

    def expire(self) -> list[tuple[str, str, Event]]:
        """Drop events older than the TTL, and the oldest beyond ``max_pending``; return ``(reason,
        event id, event)`` for each dropped label that found no prediction: ``unknown_event`` when its
        time was up, ``join_full`` when it made room."""
        lost: list[tuple[str, str, Event]] = []
        for queue in (self.done, self.open):
            while queue:
                event_id, event = next(iter(queue.items()))
                if not self._expired(event):
                    break
                del queue[event_id]
                if event.label is not None and not event.predictions:
                    lost.append(("unknown_event", event_id, event))
        while len(self) > self.max_pending:
            queue = self.done if self.done else self.open
            event_id, event = queue.popitem(last=False)
            if event.label is not None and not event.predictions:
                lost.append(("join_full", event_id, event))
        return lost


@dataclass(slots=True)
class Held:
    """A prediction read before its version's record, with where it came from and when (``read_at``:
    records the reader had read)."""

    value: dict[str, Any]
    timestamp_ms: int
    read_at: int
    key: bytes | None
    topic: str
    partition: int
    offset: int

    @property
    def model(self) -> str:
        return str(self.value["model"])

    @property
    def version(self) -> int:
        return int(self.value["version"])


class Unpublished:
    """Predictions of versions not seen yet, by model, in the order read: at most ``max_held`` per model,
    each until ``wait_ms`` of stream time or ``wait_records`` records have passed without its version."""

    def __init__(self, max_held: int, wait_ms: float, wait_records: int) -> None:
        self.max_held, self.wait_ms, self.wait_records = max_held, wait_ms, wait_records
        self.held: dict[str, deque[Held]] = {}

    def __len__(self) -> int:
        return sum(map(len, self.held.values()))

    def hold(self, held: Held) -> Held | None:
        """Hold ``held``; return the model's oldest when that made one too many."""
        queue = self.held.setdefault(held.model, deque())
        queue.append(held)
        return queue.popleft() if len(queue) > self.max_held else None

    def release(self, model: str, version: int) -> list[Held]:
        """The predictions of ``version`` held, in the order read (no longer held)."""
        queue = self.held.get(model)
        if not queue or all(h.version != version for h in queue):
            return []
        self.held[model] = deque(h for h in queue if h.version != version)
        return [h for h in queue if h.version == version]

    def expire(self, clock_ms: int, read: int) -> list[Held]:
        """Those whose time is up at stream time ``clock_ms`` with ``read`` records read."""
        out: list[Held] = []
        for queue in self.held.values():
            while queue and (
                clock_ms - queue[0].timestamp_ms > self.wait_ms or read - queue[0].read_at > self.wait_records
            ):
                out.append(queue.popleft())
        return out
