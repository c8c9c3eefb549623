"""The drift scorer: each model's live inputs and output compared with its reference profile.

The scorer watches every model of the project (its definitions from the registry, passed down from the
entry point). Each model version may carry a reference profile (one histogram per profiled input and
one of the output, see :mod:`models.profile`). What is watched per model:

- the inputs its definition names in ``monitor`` (each one the reference has a histogram of; an input
  the profile could not histogram, e.g. a string, is logged once and left out);
- its output, under :data:`models.profile.SCORE`: the prediction's ``score`` for every task. For binary
  models that is the probability of ``True``, for regression the predicted value, and for multiclass
  models the probability of the predicted class (top-class confidence). The multiclass choice: the
  ``score`` is what every task's prediction and reference profile share, so no second profile convention
  is needed, and falling confidence is how a multiclass model meets inputs unlike its training data.

For every champion prediction of a watched model the scorer pushes each watched value into a sliding
window per histogram and, every ``drift_check_every`` predictions of that model, computes the
population stability index (PSI) of each full window against its reference. A PSI above the threshold
raises one :class:`~schemas.records.DriftAlert` naming the model, the version whose reference was
compared and the input (rising edge only, re-armed once the PSI has fallen back below
``threshold * rearm_ratio``); every check also appends a compact stats point to the Redis stream
``{topic_prefix}tide:drift:{model}`` for dashboards. A prediction is compared with its own version's
reference when that version has one, else with the model's newest reference.

Alerts are produced in the processor's Kafka transaction, so they are committed exactly once with the
consumed offsets. Stats points are best-effort and may repeat after a crash.

The scorer follows the registry while it runs (:class:`schemas.registry.Follower`, polled between
batches): a model added is watched from its next version on (a version seen before its model was
known is kept aside and taken up when it is), a removed model is dropped, and a model whose monitored
inputs change is watched on the new ones from its next reference.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from prometheus_client import Counter, Gauge
from pydantic import Field

from infra import processor
from infra.deadletter import KafkaDeadLetters
from infra.errors import StreamError
from infra.kafka import make_consumer, make_transactional_producer, read_to_end
from infra.metrics import serve_metrics
from infra.settings import CommonSettings
from infra.topics import TOPICS, topic
from models.profile import SCORE, as_number
from schemas import codec, registry
from schemas.definitions import Model, Project
from schemas.records import DriftAlert, Histogram
from streams.psi import PsiDriftDetector

log = logging.getLogger(__name__)

STEP_NAME = "drift"
STATISTIC = "psi"
STATS_KEY_PREFIX = "tide:drift:"
STATS_MAXLEN = 10_000
# Bounds on per-model state: references of old versions and windows of versions no longer scored.
REFERENCES_PER_MODEL = 256
MONITORS_PER_MODEL = 4
UNKNOWN_KEPT = 4  # versions kept per model not (yet) in the definitions, newest first
FOLLOW_INTERVAL_S = 0.5  # how often the registry is looked at

DRIFT_STATISTIC = Gauge(
    "tide_drift_statistic",
    "PSI of the live window against the reference, at the last check",
    ["model", "feature"],
)
DRIFT_ALERTS = Counter("tide_drift_alerts_total", "Drift alerts raised", ["model", "feature"])

StatsFields = dict[str, str | int | float]
StatsPoint = tuple[str, StatsFields]  # (model, fields)
StatsSink = Callable[[Sequence[StatsPoint]], None]


class DriftSettings(CommonSettings):
    """Settings of the drift scorer (``TIDE_DRIFT_*``)."""

    drift_window: int = Field(default=500, ge=10)  # live values compared with the reference
    drift_check_every: int = Field(default=50, ge=1)  # predictions between two checks
    drift_psi_threshold: float = Field(default=0.25, gt=0)
    drift_rearm_ratio: float = Field(default=0.5, ge=0, le=1)
    drift_group: str = Field(default="tide-drift", pattern=r"^[A-Za-z0-9._-]+$")
    drift_min_reference: int = Field(default=1000, ge=1)  # smaller reference profiles are ignored


class AlertProducer(Protocol):
    """What the step needs of a producer (a confluent-kafka ``Producer`` in a transaction)."""

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None: ...


@dataclass(frozen=True)
class Reference:
    """A model version's reference profile: its histograms by name (the score's under ``SCORE``)."""

    model: str
    version: int
    size: int
    histograms: dict[str, Histogram]

    @classmethod
    def from_model_version(cls, record: Mapping[str, Any]) -> Reference | None:
        profile = record.get("reference")
        if profile is None:
            return None
        hists: list[Histogram] = list(profile["features"])
        if profile.get("prediction") is not None:
            score = profile["prediction"]
            hists.append(Histogram(name=SCORE, edges=score["edges"], counts=score["counts"]))
        by_name = {h["name"]: h for h in hists}
        if len(by_name) != len(hists):
            raise StreamError(f"reference of {record['model']} v{record['version']} repeats a histogram name")
        return cls(record["model"], int(record["version"]), int(profile["size"]), by_name)


@dataclass
class _Monitor:
    """The detectors of one reference, fed by the predictions compared with it."""

    reference: Reference
    detectors: dict[str, PsiDriftDetector]
    seen: int = 0
    last_used: int = 0


def _seed(monitor: _Monitor, source: _Monitor) -> None:
    """Fill ``monitor``'s windows with ``source``'s. The live windows are the model's recent inputs whichever
    reference they are compared with, so a new reference need not wait for its windows to refill. Scores
    given by another version are not carried over: they say nothing about this version's scores."""
    same_version = monitor.reference.version == source.reference.version
    for name, detector in monitor.detectors.items():
        if name in source.detectors and (name != SCORE or same_version):
            for value in source.detectors[name].live_values():
                detector.update(value)


@dataclass
class _ModelState:
    references: dict[int, Reference] = field(default_factory=dict)
    monitors: dict[int, _Monitor] = field(default_factory=dict)  # by reference version

    @property
    def latest(self) -> Reference | None:
        return self.references[max(self.references)] if self.references else None


def stats_key(model: str, namespace: str = "") -> str:
    """The Redis stream holding ``model``'s drift stats points (``namespace``: the topic prefix)."""
    return f"{namespace}{STATS_KEY_PREFIX}{model}"


class RedisStatsSink:
    """Appends stats points to ``{namespace}tide:drift:{model}`` streams (XADD, MAXLEN ~), one pipeline per
    batch. Stats are for dashboards: a failed write is logged and dropped rather than stopping the scorer.
    """

    def __init__(self, client: redis.Redis, *, namespace: str = "", maxlen: int = STATS_MAXLEN) -> None:
        self._client = client
        self._namespace = namespace
        self._maxlen = maxlen

    def __call__(self, points: Sequence[StatsPoint]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for model, fields in points:
            entry: dict[Any, Any] = dict(fields)
            pipe.xadd(stats_key(model, self._namespace), entry, maxlen=self._maxlen, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("dropped %d drift stats points: %s", len(points), exc)


def watched(model: Model) -> tuple[str, ...]:
    """What the scorer compares for ``model``: its monitored inputs, then its output (:data:`SCORE`)."""
    return (*model.monitor, SCORE)


def output_value(record: Mapping[str, Any]) -> Any:
    """The output of a prediction that is compared with the reference's output histogram: ``score`` for
    every task (multiclass: the probability of the predicted class; see the module docstring)."""
    return record["score"]


class DriftStep:
    """Stream step ``drift``: model versions set references, champion predictions feed the detectors.

    Only the models of ``project`` are watched, each on :func:`watched` (its monitored inputs and its
    output). A prediction is compared with its own version's reference when known, else its model's
    latest (highest version). Rising edges are produced as ``drift_alert`` records to ``alerts_topic``.
    """

    name = STEP_NAME

    def __init__(
        self,
        settings: DriftSettings,
        project: Project,
        producer: AlertProducer,
        alerts_topic: str,
        stats_sink: StatsSink | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._definitions: Mapping[str, Model] = project.models
        self._unknown: dict[str, dict[int, Mapping[str, Any]]] = {}  # model -> version -> record
        self._follower: registry.Follower | None = None
        self._next_follow = 0.0
        self._unwatched: set[tuple[str, int]] = set()  # (model, version) whose missing histograms were logged
        self._producer = producer
        self._alerts_topic = alerts_topic
        self._stats_sink = stats_sink
        self._clock = clock
        self._models: dict[str, _ModelState] = {}
        self._points: list[StatsPoint] = []
        self._uses = 0

    # -- inspection (tests, logs) --------------------------------------------------------------------

    def reference(self, model: str, version: int | None = None) -> Reference | None:
        """The stored reference of ``model`` at ``version``, or its latest when ``version`` is None."""
        state = self._models.get(model)
        if state is None:
            return None
        return state.latest if version is None else state.references.get(version)

    # -- Step protocol -------------------------------------------------------------------------------

    def handle(self, item: processor.Incoming) -> None:
        if item.record == "prediction":
            self._on_prediction(item.value)
        elif item.record == "model_version":
            self._on_model_version(item.value)
        else:
            raise StreamError(f"drift step does not take {item.record} records")

    def flush(self) -> bool:
        if self._points:
            if self._stats_sink is not None:
                self._stats_sink(self._points)
            self._points = []
        self._poll_registry()
        return True  # checkpoint every batch: alerts go out with the offsets that raised them

    def idle(self) -> bool:
        self._poll_registry()
        return False  # nothing is produced without input

    # -- definitions -----------------------------------------------------------------------------------

    def follow(self, follower: registry.Follower | None) -> None:
        """Take newer definitions from ``follower`` between batches."""
        self._follower = follower

    def _poll_registry(self) -> None:
        now = time.monotonic()
        if self._follower is None or now < self._next_follow:
            return
        self._next_follow = now + FOLLOW_INTERVAL_S
        found = self._follower.poll()
        if found is not None:
            log.info("definitions version %d (%s)", found.version, found.digest[:12])
            self.update(found.project)

    def update(self, project: Project) -> None:
        """Watch the models of ``project`` from now on: new ones (with the versions of them seen while
        they were unknown), not removed ones; a model whose watched inputs changed rebuilds its
        monitors from its references."""
        before, self._definitions = self._definitions, project.models
        for name in set(before) - set(project.models):
            self._models.pop(name, None)
            log.info("model %s is no longer a model of the project: not watched any more", name)
        for name, model in project.models.items():
            if name not in before:
                log.info("watching model %s", name)
                for _, record in sorted(self._unknown.pop(name, {}).items()):
                    self._on_model_version(record)
            elif watched(before[name]) != watched(model) and name in self._models:
                self._models[name].monitors.clear()  # rebuilt on the next prediction, on what it watches now
                log.info("model %s: watching %s", name, ", ".join(watched(model)))

    # -- records ---------------------------------------------------------------------------------------

    def _on_model_version(self, record: Mapping[str, Any]) -> None:
        if record["model"] not in self._definitions:
            # Perhaps of a model applied a moment ago, whose definitions this scorer has not read yet.
            log.debug("model %s v%s is not a model of the project", record["model"], record["version"])
            kept = self._unknown.setdefault(str(record["model"]), {})
            kept[int(record["version"])] = record
            for old in sorted(kept)[:-UNKNOWN_KEPT]:
                del kept[old]
            return
        ref = Reference.from_model_version(record)
        if ref is None:
            log.debug("model %s v%s has no reference profile", record["model"], record["version"])
            return
        if ref.size < self._settings.drift_min_reference:
            log.info(
                "ignoring reference of model %s v%d: %d examples < %d",
                ref.model,
                ref.version,
                ref.size,
                self._settings.drift_min_reference,
            )
            return
        state = self._models.setdefault(ref.model, _ModelState())
        if state.references.get(ref.version) == ref:
            return  # a replay of what we hold
        monitor = self._build(ref)  # validates every histogram before anything is stored
        state.references[ref.version] = ref
        replaced = state.monitors.pop(ref.version, None)
        if replaced is not None:
            _seed(monitor, replaced)
            state.monitors[ref.version] = monitor
        while len(state.references) > REFERENCES_PER_MODEL:
            oldest = min(state.references)
            del state.references[oldest]
            state.monitors.pop(oldest, None)
        log.info(
            "reference of model %s v%d: %d examples, histograms %s",
            ref.model,
            ref.version,
            ref.size,
            sorted(ref.histograms),
        )

    def _build(self, ref: Reference) -> _Monitor:
        """Detectors of what the model watches that ``ref`` has a histogram of."""
        s = self._settings
        names = watched(self._definitions[ref.model])
        missing = [n for n in names if n not in ref.histograms]
        if missing and (ref.model, ref.version) not in self._unwatched:
            self._unwatched.add((ref.model, ref.version))
            log.warning(
                "model %s v%d: the reference profile has no histogram of %s; not watched",
                ref.model,
                ref.version,
                ", ".join(missing),
            )
        detectors = {
            name: PsiDriftDetector(
                ref.histograms[name], s.drift_window, s.drift_psi_threshold, s.drift_rearm_ratio
            )
            for name in names
            if name in ref.histograms
        }
        return _Monitor(ref, detectors)

    def _monitor_for(self, model: str, version: int) -> _Monitor | None:
        state = self._models.get(model)
        if state is None:
            return None
        ref = state.references.get(version) or state.latest
        if ref is None:
            return None
        monitor = state.monitors.get(ref.version)
        if monitor is None:
            monitor = self._build(ref)
            if state.monitors:
                _seed(monitor, max(state.monitors.values(), key=lambda m: m.last_used))
                if len(state.monitors) >= MONITORS_PER_MODEL:
                    idle = min(state.monitors.values(), key=lambda m: m.last_used)
                    del state.monitors[idle.reference.version]
            state.monitors[ref.version] = monitor
            log.info(
                "model %s: comparing v%d predictions with the v%d reference", model, version, ref.version
            )
        self._uses += 1
        monitor.last_used = self._uses
        return monitor

    def _on_prediction(self, record: Mapping[str, Any]) -> None:
        if record["arm"] != "champion":
            return
        monitor = self._monitor_for(record["model"], int(record["version"]))
        if monitor is None:
            return
        inputs = record["features"]
        values: dict[str, float] = {}
        for name in monitor.detectors:  # convert all first: a bad value must not update half the windows
            raw = output_value(record) if name == SCORE else inputs.get(name)
            try:
                values[name] = as_number(raw)
            except (TypeError, ValueError):
                raise StreamError(
                    f"model {record['model']} v{record['version']}: input {name!r} is not numeric: {raw!r}"
                ) from None
        for name, value in values.items():
            monitor.detectors[name].update(value)
        monitor.seen += 1
        if monitor.seen % self._settings.drift_check_every == 0:
            self._check(monitor, record)

    def _check(self, monitor: _Monitor, record: Mapping[str, Any]) -> None:
        ref = monitor.reference
        now_ms = int(self._clock() * 1000)
        event_id: str | None = record.get("event_id")
        point: StatsFields = {"ts": now_ms, "version": ref.version, "trigger_event_id": event_id or ""}
        for name, detector in monitor.detectors.items():
            if not detector.window_full:  # a part-filled window's PSI is mostly sampling noise
                continue
            value = detector.statistic
            DRIFT_STATISTIC.labels(ref.model, name).set(value)
            point[name] = value
            if detector.check():
                self._alert(ref, detector, value, event_id, now_ms)
        self._points.append((ref.model, point))

    def _alert(
        self, ref: Reference, detector: PsiDriftDetector, value: float, event_id: str | None, now_ms: int
    ) -> None:
        alert: DriftAlert = {
            "alert_id": uuid.uuid4().hex,
            "model": ref.model,
            "version": ref.version,
            "feature": detector.name,
            "statistic": STATISTIC,
            "value": value,
            "threshold": detector.threshold,
            "window_size": detector.window,
            "reference_size": ref.size,
            "trigger_event_id": event_id,
            "ts": now_ms,
        }
        self._producer.produce(
            self._alerts_topic, value=codec.encode("drift_alert", alert), key=ref.model.encode()
        )
        DRIFT_ALERTS.labels(ref.model, detector.name).inc()
        log.warning(
            "drift alert %s: model %s v%d input %s psi %.3f > %.3f (window %d, trigger event %s)",
            alert["alert_id"],
            ref.model,
            ref.version,
            detector.name,
            value,
            detector.threshold,
            detector.window,
            event_id,
        )


# -- the service ---------------------------------------------------------------------------------------


def transactional_id(settings: DriftSettings) -> str:
    """Stable across restarts, so a restarted scorer fences its zombie and aborts what it left open.

    One per deployment (like the trainer's): a second scorer in the same group would fence the first.
    """
    return f"{settings.topic_prefix}{settings.drift_group}"


def replay_references(settings: DriftSettings, step: DriftStep, *, timeout_s: float = 30.0) -> int:
    """Feed every model version on the models topic, from its beginning, to ``step``.

    The group consumer resumes after its committed offset, so without this a restarted scorer would not
    know the references it had already seen. Stops at the end of every partition (partition EOF, which
    uses the fetch response's high watermark, not a listed end offset) or after ``timeout_s``.
    Returns how many model versions were read.
    """
    name = topic(settings, "models")
    read = 0
    try:
        for msg in read_to_end(settings, name, TOPICS["models"].partitions, timeout_s=timeout_s):
            try:
                step.handle(processor.decode_message(msg, "model_version", codec.decode_named))
            except Exception as exc:  # the group consumer dead-letters it, if it is still ahead of it
                log.warning(
                    "replay %s partition %s offset %s skipped: %s", name, msg.partition(), msg.offset(), exc
                )
                continue
            read += 1
    except StreamError as exc:
        log.warning("replay of %s incomplete (%d read): %s", name, read, exc)
    log.info("replayed %d model versions from %s", read, name)
    return read


def run(
    settings: DriftSettings,
    project: Project,
    stop: threading.Event | None = None,
    *,
    follow: bool = True,
) -> None:
    """Watch every model of ``project`` until ``stop`` is set.

    ``project`` is what the registry holds (``schemas.registry.load``) and ``stop`` the entry point's
    stop event (``infra.console.stop_event``: SIGTERM and SIGINT set it); both are passed down. With
    ``follow``, newer definitions in the registry are taken up while running (module docstring).
    """
    stop = stop if stop is not None else threading.Event()
    serve_metrics(settings)
    follower = registry.Follower(settings) if follow else None
    if follower is not None and follower.current.digest != project.digest():
        project = follower.current.project
    client = redis.Redis.from_url(settings.redis_url)
    log.info("watching models %s of project %s", ", ".join(sorted(project.models)) or "(none)", project.name)
    try:
        producer = make_transactional_producer(settings, transactional_id(settings))
        sink = RedisStatsSink(client, namespace=settings.topic_prefix)
        step = DriftStep(settings, project, producer, topic(settings, "drift-alerts"), sink)
        step.follow(follower)
        replay_references(settings, step)
        consumer = make_consumer(settings, settings.drift_group)
        dlq = KafkaDeadLetters(producer, topic(settings, "dead-letter"))
        expected: dict[str, str | None] = {
            topic(settings, "predictions"): "prediction",
            topic(settings, "models"): "model_version",
        }
        processor.run(step, consumer, producer, dlq, expected, stop, codec.decode_named)
    finally:
        if follower is not None:
            follower.close()
        client.close()
