"""``tide drift``, the service: the drift step (:mod:`streams.drift`) run exactly once over the predictions
and models topics, its positions and state checkpointed with its alerts (:mod:`schemas.checkpoints`)."""

from __future__ import annotations

import logging
import threading

import redis

from infra import processor
from infra.deadletter import KafkaDeadLetters
from infra.kafka import make_consumer, make_transactional_producer
from infra.metrics import serve_metrics
from infra.topics import topic
from models.versions import replay_versions
from schemas import codec, registry
from schemas.checkpoints import KafkaCheckpoints
from schemas.definitions import Project
from streams.drift import DriftSettings, DriftStep, RedisStatsSink

log = logging.getLogger(__name__)


def transactional_id(settings: DriftSettings) -> str:
    """Stable across restarts, so a restarted scorer fences its zombie and aborts what it left open.

    One per deployment (like the trainer's): a second scorer in the same group would fence the first.
    """
    return f"{settings.topic_prefix}{settings.drift_group}"


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
        replay_versions(settings, step.version_seen)
        consumer = make_consumer(settings, settings.drift_group)
        dlq = KafkaDeadLetters(producer, topic(settings, "dead-letter"))
        expected: dict[str, str | None] = {
            topic(settings, "predictions"): "prediction",
            topic(settings, "models"): "model_version",
        }
        processor.run(
            step,
            consumer,
            producer,
            dlq,
            expected,
            stop,
            codec.decode_named,
            checkpoints=KafkaCheckpoints(settings, transactional_id(settings)),
            min_interval_s=settings.drift_checkpoint_interval_s,
        )
    finally:
        if follower is not None:
            follower.close()
        client.close()
