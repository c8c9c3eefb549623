"""The online trainer (``tide train``): every model of the project that declares a learner learns from
its labels, progressively, and publishes versions.

Per model, each label (a record of its labels source, keyed by ``labels.key``) is learnt once, from one of
two inputs:

- **served**: the inputs logged with the event's prediction (``prediction.event_id`` equal to the label's
  key; champion and canary arms only: a shadow's answer was not what the caller received). Predictions
  and labels are parked in Redis under the key until the other side arrives, so the join survives
  restarts (:mod:`online_training.joins`).
- **replayed**: point-in-time features replayed from the topics (:mod:`online_training.history`), for
  events that were never scored. A model that starts without a river version first learns every label
  of history this way, in event-time order (its bootstrap), and publishes that as a version. Later, a
  label that waited ``trainer_prediction_grace_s`` for its prediction in vain is learnt this way by the
  next catch-up (labels due together are learnt in event-time order).

Learning is progressive, as ``river.evaluate.progressive_val_score``: predict, feed the model's declared
metric, learn (:class:`online_training.learner.OnlineModel`). Every ``publish_every`` labels (or after
``trainer_publish_interval_s`` when quiet) a model publishes a version: its pickled learner, task,
classes, input names, metric and a reference profile of its monitored inputs and scores. Versions and the
consumed offsets are committed in one Kafka transaction; a restarted trainer resumes each model from its
newest river version.

Nothing is learnt twice. Within a run, every label learnt leaves a marker in Redis and a label whose
marker is set is never learnt again, whichever path comes second (a prediction arriving after its label
was replayed, a label delivered twice, history the bootstrap learnt and the consumer group then reads).
Across a crash, markers carry the run (epoch) and the version they went into, and only count when that
version was committed (see :mod:`online_training.joins`): what the crashed run learnt after its last
version is learnt again, once, into the restored learner, while the consumer replays from the offsets
committed with that version. Each model's learn log (a Redis list, :func:`learn_log`) records the keys
in the order learnt, with the prediction made before learning each.

Limits: markers, parked inputs and waiting labels live ``trainer_join_ttl_s`` plus the labels'
``max_delay``; a label redelivered after that is learnt again. A catch-up replays the model's sources
from the beginning (its cost grows with history; it is meant for the occasional unscored event, and a
label whose event never shows up is looked for again after ever longer waits until it expires). When
nothing unpublished was learnt, consumed offsets are checkpointed without a version (duplicates and
parked records need no version). A model with both a learner and a batch trainer gets version numbers
from both trainers, each taking the next after the newest it has seen: run them so they do not publish
at the same moment.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from confluent_kafka import Producer
from prometheus_client import Counter, Gauge

from features.training import Example, target_of
from infra import processor
from infra.deadletter import KafkaDeadLetters
from infra.errors import ModelLoadError, TrainingError
from infra.imports import add_code_path
from infra.kafka import make_consumer, make_transactional_producer
from infra.metrics import serve_metrics
from infra.processor import Incoming
from infra.topics import prefixed, topic
from models.artifacts import load_river, record_artifact
from online_training.history import all_examples, examples_of
from online_training.joins import JoinStore, Waiting, log_entry, now_ms, read_log
from online_training.learner import OnlineModel, build_learner, profiled_inputs
from online_training.publish import publish_model_version, read_versions, signer_of
from online_training.settings import RetrainSettings, TrainerSettings
from schemas import codec
from schemas.definitions import Labels, Model, Project

__all__ = [
    "RetrainSettings",
    "TrainerSettings",
    "TrainerStep",
    "learn_log",
    "learner_models",
    "restore",
    "run",
]

log = logging.getLogger(__name__)

LEARNT = Counter(
    "tide_trainer_labels_learnt_total", "Labels learnt, by where the inputs came from", ["model", "path"]
)
DUPLICATES = Counter("tide_trainer_labels_duplicate_total", "Labels not learnt: already learnt", ["model"])
PUBLISHED = Counter("tide_trainer_versions_published_total", "Model versions published", ["model"])
METRIC = Gauge("tide_trainer_online_metric", "Progressive metric of the online learner", ["model", "metric"])
WAITING = Gauge("tide_trainer_labels_waiting", "Labels waiting for their prediction or a replay", ["model"])
SERVED_ARMS = ("champion", "canary")  # shadow predictions were not what the caller received
SERVED, REPLAYED = "served", "replayed"


def learner_models(project: Project) -> list[Model]:
    """The models the online trainer trains: those with a learner (and so labels), by name."""
    return [m for _, m in sorted(project.models.items()) if m.learner is not None and m.labels is not None]


def transactional_id(settings: TrainerSettings) -> str:
    """Stable across restarts, so a restarted trainer fences its zombie and aborts what it left open."""
    return f"{settings.topic_prefix}{settings.trainer_group}"


@dataclass
class _State:
    """One model in the trainer: its learner and Redis state, and what its current batch brought."""

    online: OnlineModel
    store: JoinStore
    labels: Labels
    published_at: float = field(default_factory=time.monotonic)
    next_catchup: float = 0.0
    served: dict[str, dict[str, Any]] = field(default_factory=dict)
    waiting: dict[str, Waiting] = field(default_factory=dict)
    order: list[tuple[bool, str]] = field(default_factory=list)  # (is a label, key) in arrival order


class TrainerStep:
    """The join-learn-publish step over the predictions topic and every labels source (module docstring)."""

    name = "trainer"

    def __init__(
        self,
        settings: TrainerSettings,
        project: Project,
        producer: Producer,
        models: Mapping[str, tuple[OnlineModel, JoinStore]],
    ) -> None:
        self.settings = settings
        self.project = project
        self.digest = project.digest()
        self._producer = producer
        self.states: dict[str, _State] = {}
        self.by_labels_source: dict[str, list[_State]] = {}
        for name, (online, store) in models.items():
            spec = online.model.labels
            assert spec is not None
            state = _State(online, store, spec)
            self.states[name] = state
            self.by_labels_source.setdefault(spec.source.name, []).append(state)
        self._grace_ms = int(settings.trainer_prediction_grace_s * 1000)
        self._consumed = False  # records handled since the last checkpoint
        self._checkpointed_at = time.monotonic()

    # --- the stream ------------------------------------------------------------------------------------

    def handle(self, item: Incoming) -> None:
        self._consumed = True
        v = item.value
        if item.record == "prediction":
            state = self.states.get(v["model"])
            key = v.get("event_id")
            if state is not None and key and v["arm"] in SERVED_ARMS:
                state.served[key] = v["features"]
                state.order.append((False, key))
            return
        for state in self.by_labels_source.get(item.record, ()):
            spec = state.labels
            raw_key, target = v.get(spec.key), v.get(spec.target)
            if raw_key is None or target is None:
                raise TrainingError(f"labels {spec.name!r}: a record without {spec.key!r} or {spec.target!r}")
            ts = v.get(spec.source.event_time)
            key = str(raw_key)
            state.waiting[key] = Waiting(raw_key, target, ts if isinstance(ts, int) else None, now_ms())
            state.order.append((True, key))

    def flush(self) -> bool:
        for state in self.states.values():
            if state.order:
                self._join(state)
        return self._after_batch()

    def idle(self) -> bool:
        return self._after_batch()

    def _after_batch(self) -> bool:
        now = time.monotonic()
        published = False
        for state in self.states.values():
            if now >= state.next_catchup:
                state.next_catchup = now + self.settings.trainer_catchup_interval_s
                self.catch_up(state)
            online = state.online
            due = online.since_publish >= online.model.publish_every or (
                online.since_publish and now - state.published_at >= self.settings.trainer_publish_interval_s
            )
            if due:
                self.publish(state)
                published = True
        if (
            not published
            and self._consumed
            and now - self._checkpointed_at >= self.settings.trainer_publish_interval_s
        ):
            # Records that taught nothing unpublished (duplicates, labels parked in Redis, inputs parked
            # for labels to come): their offsets may be committed without a version.
            published = all(state.online.since_publish == 0 for state in self.states.values())
        if published:
            self._consumed = False
            self._checkpointed_at = now
        return published

    def _join(self, state: _State) -> None:
        served, waiting, order = state.served, state.waiting, state.order
        state.served, state.waiting, state.order = {}, {}, []
        store, online = state.store, state.online
        by_served, by_label = store.exchange(served, waiting)
        learnt: list[tuple[str, dict[str, Any], Any]] = []
        done: set[str] = set()
        park: dict[str, Waiting] = {}
        for is_label, key in order:
            if key in done:
                continue
            if is_label:
                parked, marker = by_label[key]
                if store.learnt(marker):
                    DUPLICATES.labels(online.name).inc()
                    done.add(key)
                elif parked is not None:
                    learnt.append((key, orjson.loads(parked), waiting[key].y))
                    done.add(key)
                else:
                    park[key] = waiting[key]
            else:
                label, marker = by_served[key]
                if label is not None and not store.learnt(marker):
                    learnt.append((key, served[key], Waiting.loads(label).y))
                    done.add(key)
        for key in done:
            park.pop(key, None)
        self._learn(state, [(key, x, y) for key, x, y in learnt], SERVED, park)

    def _learn(
        self,
        state: _State,
        examples: Sequence[tuple[str, dict[str, Any], Any]],
        path: str,
        park: Mapping[str, Waiting] | None = None,
    ) -> None:
        """Learn ``(key, x, raw target)`` in order; write markers, the learn log and labels to park."""
        online, store = state.online, state.store
        version = online.version + 1
        marker = store.marker(version)
        keep_log = self.settings.trainer_learn_log
        markers: dict[str, bytes] = {}
        entries: list[bytes] = []
        task = online.task
        for key, x, raw in examples:
            y = target_of(task, raw)
            y_pred = online.learn(x, y)
            markers[key] = marker
            if keep_log:
                entries.append(log_entry(store.epoch, version, key, path, y, y_pred))
        store.record(markers, park or {}, now_ms() + self._grace_ms, entries, keep_log)
        if examples:
            LEARNT.labels(online.name, path).inc(len(examples))

    # --- labels of events never scored ----------------------------------------------------------------

    def catch_up(self, state: _State) -> int:
        """Learn the labels whose grace has passed: from inputs served meanwhile, else from replayed
        point-in-time features. Returns how many were learnt."""
        store, online = state.store, state.online
        keys = store.due(now_ms(), self.settings.trainer_catchup_max)
        if not keys:
            WAITING.labels(online.name).set(store.pending_count())
            return 0
        forget, todo = [], {}
        for key, (label, marker) in zip(keys, store.waiting(keys), strict=True):
            if label is None:
                forget.append(key)  # expired: waited longer than the join TTL
            elif store.learnt(marker):
                if store.committed_marker(marker, online.version):
                    forget.append(key)
            else:
                todo[key] = label
        store.forget(forget)
        if not todo:
            return 0
        served = [
            (k, x, todo[k].y) for k, x in zip(todo, store.parked(list(todo)), strict=True) if x is not None
        ]
        self._learn(state, served, SERVED)
        rest = [todo[k] for k in todo if k not in {k for k, _, _ in served}]
        spec = state.labels
        records = [{spec.key: w.key, spec.target: w.y, spec.source.event_time: w.ts} for w in rest]
        examples = examples_of(self.settings, self.project, online.model, records)
        self._learn(state, _triples(examples), REPLAYED)
        found = {str(e.key) for e in examples}
        now = now_ms()
        # Events not on the topic (yet): look again after as long as each label has waited (every look
        # replays the topics), until the label expires.
        store.postpone(
            {
                str(w.key): now + max(self._grace_ms, 1000, now - (w.seen_ms or now))
                for w in rest
                if str(w.key) not in found
            }
        )
        WAITING.labels(online.name).set(store.pending_count())
        return len(served) + len(examples)

    def learn(self, model: str, examples: Sequence[Example], path: str = REPLAYED) -> None:
        """Learn ``examples`` of ``model`` in order, as a catch-up does (markers, learn log, counters)."""
        state = self.states[model]
        for start in range(0, len(examples), 5000):
            self._learn(state, _triples(examples[start : start + 5000]), path)

    def bootstrap(self, state: _State) -> int:
        """Learn every labelled event of history from replayed features (a model without a version)."""
        examples = all_examples(self.settings, self.project, state.online.model)
        self.learn(state.online.name, examples)
        log.info("model %s: learnt %d labels of history", state.online.name, len(examples))
        return len(examples)

    # --- versions ---------------------------------------------------------------------------------------

    def publish(self, state: _State, *, wait: bool = False) -> dict[str, Any]:
        """Publish the model's next version: to the step's transactional producer (committed with the
        consumed offsets at the checkpoint that follows), or, with ``wait``, outside any transaction
        (this returns once the broker has the record)."""
        online, model = state.online, state.online.model
        version = online.version + 1
        state.store.save_metric(version, pickle.dumps(online.metric, protocol=pickle.HIGHEST_PROTOCOL))
        record = publish_model_version(
            self.settings,
            model=model.name,
            version=version,
            flavor="river",
            artifact=online.dump(),
            feature_names=model.input_names,
            metric_name=model.metric_name,
            metric_value=online.metric_value(),
            trained_on=online.trained_on,
            reference=online.profile(),
            task=model.task,
            classes=online.sorted_classes(),
            definitions_digest=self.digest,
            producer=None if wait else self._producer,
        )
        online.version = version
        online.since_publish = 0
        state.published_at = time.monotonic()
        PUBLISHED.labels(model.name).inc()
        if record["metric_value"] is not None:
            METRIC.labels(model.name, model.metric_name).set(record["metric_value"])
        return record


def _triples(examples: Sequence[Example]) -> list[tuple[str, dict[str, Any], Any]]:
    return [(str(e.key), e.x, e.y) for e in examples]


# --- start-up -----------------------------------------------------------------------------------------------


def _restore_one(
    settings: TrainerSettings,
    project: Project,
    model: Model,
    river: Mapping[str, Any] | None,
    newest: Mapping[str, Any] | None,
    store: JoinStore,
) -> OnlineModel:
    version = int(newest["version"]) if newest else 0
    size, profiled = settings.trainer_reference_size, profiled_inputs(project, model)
    if river is None:
        store.start_epoch(0)
        return OnlineModel(
            model, build_learner(model), version=version, reference_size=size, profiled=profiled
        )
    try:
        learner = load_river(record_artifact(river), river["sha256"])
    except ModelLoadError as exc:
        raise TrainingError(
            f"model {model.name!r}: cannot resume from version {river['version']}: {exc}"
        ) from exc
    store.start_epoch(int(river["version"]))
    metric = None
    blob = store.load_metric(int(river["version"]))
    if blob is not None:
        try:
            metric = pickle.loads(blob)
        except Exception as exc:  # a metric of another river version: start it afresh
            log.warning(
                "model %s: metric state of version %s not restored: %s", model.name, river["version"], exc
            )
    log.info(
        "model %s: resuming from version %d (trained on %d)",
        model.name,
        river["version"],
        river["trained_on"],
    )
    return OnlineModel(
        model,
        learner,
        metric=metric,
        version=version,
        trained_on=int(river["trained_on"]),
        classes=tuple(river.get("classes") or ()),
        reference_size=size,
        profiled=profiled,
    )


def restore(
    settings: TrainerSettings, project: Project, producer: Producer, client: redis.Redis
) -> TrainerStep:
    """The step for every learner model of ``project``: each resumed from its newest river version, or
    bootstrapped from history (learnt, then published as its next version, outside any transaction)."""
    newest: dict[str, dict[str, Any]] = {}
    river: dict[str, dict[str, Any]] = {}
    for record in read_versions(settings):
        name = record["model"]
        if name not in newest or record["version"] > newest[name]["version"]:
            newest[name] = record
        if record["flavor"] == "river" and (name not in river or record["version"] > river[name]["version"]):
            river[name] = record
    models = {}
    for model in learner_models(project):
        assert model.labels is not None
        ttl = settings.trainer_join_ttl_s + model.labels.max_delay_ms // 1000
        store = JoinStore(client, settings.topic_prefix, model.name, ttl)
        models[model.name] = (
            _restore_one(settings, project, model, river.get(model.name), newest.get(model.name), store),
            store,
        )
    step = TrainerStep(settings, project, producer, models)
    for name, state in step.states.items():
        if name in river:
            continue
        learnt = step.bootstrap(state)
        if learnt or name not in newest:  # a first version (even untrained) lets serving start
            step.publish(state, wait=True)
    return step


def learn_log(settings: TrainerSettings, model: str) -> list[dict[str, Any]]:
    """The model's learn log (see :func:`online_training.joins.read_log`)."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return read_log(client, settings.topic_prefix, model)
    finally:
        client.close()


def run(settings: TrainerSettings, project: Project, stop: threading.Event | None = None) -> None:
    """Train every learner model of ``project`` until ``stop`` is set.

    ``project`` is what the registry holds (``schemas.registry.load``) and ``stop`` the entry point's stop
    event (``infra.console.stop_event``); both are passed down.
    """
    stop = stop if stop is not None else threading.Event()
    add_code_path(settings.project)
    serve_metrics(settings)
    signer_of(settings)  # a bad signing key fails now, not at the first publish
    models = learner_models(project)
    if not models:
        log.warning("project %s has no model with a learner: nothing to train", project.name)
        stop.wait()
        return
    log.info("training models %s of project %s", ", ".join(m.name for m in models), project.name)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        producer = make_transactional_producer(settings, transactional_id(settings))
        step = restore(settings, project, producer, client)
        consumer = make_consumer(settings, settings.trainer_group)
        expected: dict[str, str | None] = {topic(settings, "predictions"): "prediction"}
        for model in models:
            assert model.labels is not None
            source = model.labels.source
            expected[prefixed(settings, source.topic_name)] = source.name
        dlq = KafkaDeadLetters(producer, topic(settings, "dead-letter"))
        processor.run(step, consumer, producer, dlq, expected, stop, codec.decode_named)
    finally:
        client.close()
