"""Tide's own topics: one name, partition count and record type each.

The topics of a project's sources are declared with the sources (:class:`schemas.definitions.Source`)
and created by ``tide apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plain data at run time: the Flink job imports this without the service stack
    from infra.settings import CommonSettings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    record: str | None  # schemas.codec record name; None for raw (dead letters)
    compacted: bool = False


TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        TopicSpec("predictions", 4, "prediction"),
        # Model versions and deployments are state: every serving node reads them from the beginning.
        TopicSpec("models", 1, "model_version", compacted=True),
        TopicSpec("deployments", 1, "deployment", compacted=True),
        # Applied project definitions: every service reads the newest at start.
        TopicSpec("registry", 1, "definitions", compacted=True),
        TopicSpec("drift-alerts", 1, "drift_alert"),
        TopicSpec("canary-verdicts", 1, "canary_verdict"),
        # Each stream processor's positions and state, keyed by processor (infra/processor.py).
        TopicSpec("checkpoints", 1, "checkpoint", compacted=True),
        TopicSpec("dead-letter", 1, None),
    )
}


def topic(settings: CommonSettings, name: str) -> str:
    """The full topic name for ``name`` (one of :data:`TOPICS`) under the configured prefix."""
    return settings.topic_prefix + TOPICS[name].name


def ensure_topics(settings: CommonSettings, *, replication_factor: int = 1) -> None:
    """Create every topic of the loop with its partition count (existing topics are kept)."""
    from infra.admin import create_topics

    by_config: dict[bool, dict[str, int]] = {}
    for spec in TOPICS.values():
        by_config.setdefault(spec.compacted, {})[topic(settings, spec.name)] = spec.partitions
    for compacted, topics in by_config.items():
        config = {"cleanup.policy": "compact"} if compacted else None
        create_topics(settings.kafka_bootstrap, topics, config=config, replication_factor=replication_factor)


def prefixed(settings: CommonSettings, name: str) -> str:
    """A project topic's full name (a source's ``topic_name``) under the configured prefix."""
    return settings.topic_prefix + name
