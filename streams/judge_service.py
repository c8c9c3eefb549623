"""The judge as a service: ``tide judge`` (:func:`run`) binds :class:`streams.judge.JudgeStep` to a
transactional producer, the group consumer and the checkpoints, and runs it with
:func:`infra.processor.run` (what it does: :mod:`streams.judge`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from confluent_kafka import Producer

from infra import processor
from infra.deadletter import DeadLetterSink, KafkaDeadLetters
from infra.kafka import make_consumer, make_transactional_producer
from infra.letters import DeadLetter
from infra.metrics import serve_metrics
from infra.settings import CommonSettings
from infra.topics import topic
from models.versions import replay_versions
from schemas import codec, registry
from schemas.checkpoints import KafkaCheckpoints
from schemas.definitions import Model, Project
from streams.judge import JudgeSettings, JudgeStep
from streams.judging import Emitter, judged_models

log = logging.getLogger(__name__)


class TransactionEmitter(Emitter):
    """Produces into the judge's transactional producer (committed with the checkpoint)."""

    def __init__(self, settings: CommonSettings, producer: Producer, dlq: DeadLetterSink) -> None:
        super().__init__(
            verdicts=topic(settings, "canary-verdicts"),
            deployments=topic(settings, "deployments"),
            alerts=topic(settings, "drift-alerts"),
        )
        self._producer = producer
        self._dlq = dlq

    def produce(self, topic_name: str, value: bytes, key: bytes) -> None:
        self._producer.produce(topic_name, value=value, key=key)

    def dead_letter(self, letter: DeadLetter) -> None:
        self._dlq.send(letter)


# -- the service -------------------------------------------------------------------------------------------


def transactional_id(settings: JudgeSettings) -> str:
    """Stable across restarts: a restarted judge fences its zombie and takes its checkpoints."""
    return f"{settings.topic_prefix}{settings.judge_group}"


def run(
    settings: JudgeSettings,
    project: Project,
    stop: threading.Event | None = None,
    *,
    follow: bool = True,
) -> None:
    """Judge every model of ``project`` that has labels until ``stop`` is set (module docstring)."""
    stop = stop if stop is not None else threading.Event()
    serve_metrics(settings)
    follower = registry.Follower(settings) if follow else None
    if follower is not None and follower.current.digest != project.digest():
        project = follower.current.project
    models: Mapping[str, Model] = judged_models(project)
    log.info("judging models %s of project %s", ", ".join(sorted(models)) or "(none)", project.name)
    try:
        tid = transactional_id(settings)
        producer = make_transactional_producer(settings, tid)
        dlq = KafkaDeadLetters(producer, topic(settings, "dead-letter"))
        step = JudgeStep(settings, project, TransactionEmitter(settings, producer, dlq))
        checkpoints = KafkaCheckpoints(settings, tid)
        consumer = make_consumer(settings, settings.judge_group)
        step.follow(follower, consumer, checkpoints)
        expected = step.topics()
        replay_versions(settings, step.version_seen)
        processor.run(
            step,
            consumer,
            producer,
            dlq,
            expected,
            stop,
            codec.decode_named,
            batch=settings.judge_batch,
            checkpoints=checkpoints,
            min_interval_s=settings.judge_checkpoint_interval_s,
        )
    finally:
        if follower is not None:
            follower.close()
