"""Dead letters: records a processor could not handle, kept with the reason instead of stopping it.

Each dead letter is the original key and value, unchanged, with headers naming the stage, the error and
where the record came from, so it can be inspected (``tide tail dead-letter``) and replayed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import Producer
from prometheus_client import Counter

from infra.letters import DeadLetter

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter("tide_dead_letters_total", "Records sent to the dead-letter topic", ["stage"])


class DeadLetterSink(Protocol):
    def send(self, letter: DeadLetter) -> None: ...


class KafkaDeadLetters:
    """Sends dead letters to a topic with the shared producer; the caller flushes before committing."""

    def __init__(self, producer: Producer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    def send(self, letter: DeadLetter) -> None:
        log.warning(
            "dead letter stage=%s topic=%s partition=%d offset=%d: %s",
            letter.stage,
            letter.source_topic,
            letter.partition,
            letter.offset,
            letter.error,
        )
        DEAD_LETTERS.labels(letter.stage).inc()
        self._producer.produce(self._topic, key=letter.key, value=letter.value, headers=letter.headers())


@dataclass
class MemoryDeadLetters:
    """Collects dead letters in memory (unit tests)."""

    letters: list[DeadLetter] = field(default_factory=list)

    def send(self, letter: DeadLetter) -> None:
        DEAD_LETTERS.labels(letter.stage).inc()
        self.letters.append(letter)
