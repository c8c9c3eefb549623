"""The online trainer (``tide train``): every model of the project that declares a learner learns from
its labels, progressively, and publishes versions. The step is :mod:`online_training.step`.

Per model, each label (a record of its labels source, keyed by ``labels.key``) is learnt once, from one of
two inputs:

- **served**: the inputs logged with the event's prediction (``prediction.event_id`` equal to the label's
  key; champion and canary arms only: a shadow's answer was not what the caller received). Predictions
  and labels are parked in Redis under the key until the other side arrives, so the join survives
  restarts (:mod:`online_training.joins`).
- **replayed**: point-in-time features replayed from the topics (:mod:`online_training.history`), for
  events that were never scored. A lineage starts by learning every label of history this way, in
  event-time order (its bootstrap), and publishes that as a version. Later, a label that waited
  ``trainer_prediction_grace_s`` for its prediction in vain is learnt this way by the next catch-up
  (labels due together are learnt in event-time order).

Lineage (:mod:`online_training.lineage`): each model trains on, per view it reads, the newest version
the feature processor reports live (a model with a view not live yet waits), and every version records
the registry digest and those view versions. Served inputs teach a lineage only when the version that
served them was trained on the same inputs and view versions; other labels are learnt from features
replayed through the lineage's own view versions. When a model's binding changes (a newer view version
goes live; its features, task, labels or learner change), a new lineage replays history in the
background while the current one keeps learning and publishing, then takes over: labels that arrived
meanwhile wait in its own Redis state and its catch-up learns them. A restarted trainer resumes a
model's newest river version only when it was trained under the model's binding now; else a new
lineage starts.

Live definitions: ``tide train`` follows the registry (:class:`schemas.registry.Follower`, polled in the
processor loop every ``trainer_follow_interval_s``): a model added starts being trained (history
first), a removed one stops, and the consumer is resubscribed when the labels sources needed change
(the records consumed since the last checkpoint come again, and are learnt once or parked again).

Learning is progressive, as ``river.evaluate.progressive_val_score``: predict, feed the model's declared
metric, learn (:class:`online_training.learner.OnlineModel`). Every ``publish_every`` labels (or after
``trainer_publish_interval_s`` when quiet) a model publishes a version: its pickled learner, task,
classes, input names, metric and a reference profile of its monitored inputs and scores. Versions and the
consumed offsets are committed in one Kafka transaction.

Nothing is learnt twice (by a lineage; a new lineage learns every label anew). Within a run, every label
learnt leaves a marker in Redis and a label whose marker is set is never learnt again, whichever path
comes second (a prediction arriving after its label was replayed, a label delivered twice, history the
bootstrap learnt and the consumer group then reads). Across a crash, markers carry the run (epoch) and
the version they went into, and only count when that version was committed (see
:mod:`online_training.joins`): what the crashed run learnt after its last version is learnt again, once,
into the restored learner, while the consumer replays from the offsets committed with that version. Each
model's learn log (a Redis list, :func:`learn_log`) records the keys in the order learnt, with the
prediction made before learning each.

Blessing and lineage (:mod:`online_training.publishing`): every version records its parent (the
lineage's previous version; for a lineage's first, the champion when it started), its trigger
(``schedule``, or the drift alert it answers), the data it learnt (event-time range, and the next offsets
of the predictions and labels partitions read) and its blessing against the champion (the model's newest
blessed version) on the lineage's recent window, prequentially (:mod:`online_training.refresh`). An
unblessed version is published all the same, with the reason; serving never makes it champion.

Drift alerts (topic ``drift-alerts``, read by the same processor): an alert of a kind the model's
``policy.retrain.on`` lists refreshes it — a fresh learner from its factory warmed on the window,
published with the alert as trigger and the champion as parent, blessed, and continued by the lineage
once blessed — at most once per ``min_interval_s`` and once per alert (:mod:`online_training.triggers`);
the version commits in the transaction that consumes the alert. A concept alert that estimates its change
point waits instead until labels since it are learnt, and the fresh learner is warmed and blessed on those
(:mod:`online_training.refresh`); the waiting refreshes are the step's checkpointed state. Positions are
kept on the ``checkpoints`` topic with each transaction (:mod:`schemas.checkpoints`), so a broker that
ignores transactions holding only offsets never makes the trainer re-read old records.

Limits: markers, parked inputs and waiting labels live ``trainer_join_ttl_s`` plus the labels'
``max_delay``; a label redelivered after that is learnt again. A catch-up replays the model's sources
from the beginning (its cost grows with history; it is meant for the occasional unscored event, and a
label whose event never shows up is looked for again after ever longer waits until it expires). When
nothing unpublished was learnt, consumed offsets are checkpointed without a version (duplicates and
parked records need no version). A model with both a learner and a batch trainer gets version numbers
from both trainers, each taking the next after the newest it has seen (the trainer reads the models
topic as it runs): run them so they do not publish at the same moment.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from confluent_kafka import Producer

from features.versions import read_states
from infra import processor
from infra.deadletter import KafkaDeadLetters
from infra.imports import add_code_path
from infra.kafka import make_consumer, make_transactional_producer
from infra.metrics import serve_metrics
from infra.topics import topic
from models.versions import read_versions
from online_training.joins import read_log
from online_training.lineage import (
    SIDE,
    LineageIndex,
    binding_of,
    learner_models,
    new_lineage,
    resumable,
    resume_lineage,
)
from online_training.publish import signer_of
from online_training.settings import RetrainSettings, TrainerSettings
from online_training.step import TrainerStep
from schemas import codec, registry
from schemas.checkpoints import KafkaCheckpoints
from schemas.definitions import Project

__all__ = [
    "RetrainSettings",
    "TrainerSettings",
    "TrainerStep",
    "learn_log",
    "learner_models",
    "restore",
    "run",
    "transactional_id",
]

log = logging.getLogger(__name__)


def transactional_id(settings: TrainerSettings) -> str:
    """Stable across restarts, so a restarted trainer fences its zombie and aborts what it left open."""
    return f"{settings.topic_prefix}{settings.trainer_group}"


def restore(
    settings: TrainerSettings,
    project: Project,
    producer: Producer,
    client: redis.Redis,
    *,
    digest: str | None = None,
) -> TrainerStep:
    """The step for every learner model of ``project`` whose views have a live version: each resumed
    from its newest river version when that was trained under the binding it has now, else a new
    lineage bootstrapped from history (learnt, then published as its next version, outside any
    transaction). A model with a view not live yet waits (the step starts it once it is)."""
    step = TrainerStep(settings, project, producer, client=client, digest=digest)
    rivers: dict[str, list[dict[str, Any]]] = {}
    for record in read_versions(settings):
        step.seen_version(record)
        if record["flavor"] == "river":
            rivers.setdefault(record["model"], []).append(record)
    states = read_states(client, settings.topic_prefix)
    fresh = []
    for model in learner_models(project):
        binding = binding_of(project, model, states)
        if binding is None:
            step.rebind(model, None, states)  # logs that it waits
            continue
        newest = step.newest(model.name)
        index = LineageIndex(client, settings.topic_prefix, model.name)
        found = _continued(rivers.get(model.name, []), index)
        lineage = resumable(found, binding, index) if found is not None else None
        if found is not None and lineage is not None:
            step.add(resume_lineage(settings, project, binding, lineage, found, client, newest))
            step.note_offsets((found.get("data") or {}).get("offsets") or {})
        else:
            state = new_lineage(settings, project, binding, client, newest)
            state.parent_version = step.champions.version(model.name)
            step.add(state)
            fresh.append(state)
    for state in fresh:
        learnt = step.bootstrap(state)
        if learnt or not step.newest(state.online.name):  # a first version lets serving start
            step.publish(state, wait=True)
    step.topics()
    return step


def _continued(records: list[dict[str, Any]], index: LineageIndex) -> dict[str, Any] | None:
    """The newest river version a lineage continues from (not a refresh left beside its lineage)."""
    for record in sorted(records, key=lambda r: -int(r["version"])):
        if not (index.of(int(record["version"])) or "").startswith(SIDE):
            return record
    return None


def learn_log(settings: TrainerSettings, model: str) -> list[dict[str, Any]]:
    """The model's learn log, every lineage's (see :func:`online_training.joins.read_log`)."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return read_log(client, settings.topic_prefix, model)
    finally:
        client.close()


def run(
    settings: TrainerSettings,
    project: Project,
    stop: threading.Event | None = None,
    *,
    follow: bool = True,
) -> None:
    """Train every learner model of ``project`` until ``stop`` is set.

    ``project`` is what the registry holds (``schemas.registry.load``) and ``stop`` the entry point's stop
    event (``infra.console.stop_event``); both are passed down. With ``follow``, the registry is followed
    while running: a model added starts being trained (history first), a removed one stops, a changed one
    starts a new lineage, all without a restart.
    """
    stop = stop if stop is not None else threading.Event()
    add_code_path(settings.project)
    serve_metrics(settings)
    signer_of(settings)  # a bad signing key fails now, not at the first publish
    follower = registry.Follower(settings) if follow else None
    digest = None
    if follower is not None:
        project, digest = follower.current.project, follower.current.digest
    models = learner_models(project)
    log.info(
        "training models %s of project %s",
        ", ".join(m.name for m in models) or "(none yet)",
        project.name,
    )
    client = redis.Redis.from_url(settings.redis_url)
    step: TrainerStep | None = None
    try:
        producer = make_transactional_producer(settings, transactional_id(settings))
        step = restore(settings, project, producer, client, digest=digest)
        consumer = make_consumer(settings, settings.trainer_group)
        # Positions kept with the versions (a record in every transaction): see schemas.checkpoints.
        checkpoints = KafkaCheckpoints(settings, transactional_id(settings))
        step.follow(follower, consumer, on_assign=checkpoints.on_assign)
        dlq = KafkaDeadLetters(producer, topic(settings, "dead-letter"))
        processor.run(
            step, consumer, producer, dlq, step.topics(), stop, codec.decode_named, checkpoints=checkpoints
        )
    finally:
        if step is not None:
            step.close()
        if follower is not None:
            follower.close()
        client.close()
