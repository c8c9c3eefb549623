"""Reading model versions back: every ``model_version`` record on the models topic, from its beginning.

Services that keep state per model version (the trainer's lineage and triggers, the drift scorer's
references, the judge's lineages) read the topic to its end when they start, since their group consumer
resumes after what they had committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from infra.errors import StreamError
from infra.kafka import read_to_end
from infra.settings import CommonSettings
from infra.topics import TOPICS, topic
from schemas import codec

log = logging.getLogger(__name__)


def read_versions(settings: CommonSettings, *, timeout_s: float = 30.0) -> Iterator[dict[str, Any]]:
    """Every committed ``model_version`` record on the models topic, from the beginning, in log order
    (undecodable records are logged and skipped). Raises :class:`infra.errors.StreamError` when the end
    is not reached within ``timeout_s``."""
    name = topic(settings, "models")
    for msg in read_to_end(settings, name, TOPICS["models"].partitions, timeout_s=timeout_s):
        try:
            yield codec.decode(msg.value() or b"", "model_version")
        except Exception as exc:  # whoever consumes the topic as a group dead-letters it
            log.warning("%s partition %s offset %s skipped: %s", name, msg.partition(), msg.offset(), exc)


def replay_versions(
    settings: CommonSettings, see: Callable[[dict[str, Any]], object], *, timeout_s: float = 30.0
) -> int:
    """Pass every model version on the models topic, from its beginning, to ``see``; returns how many.
    A topic whose end is not reached within ``timeout_s`` is logged and what was read kept: the service
    goes on with what it knows and learns the rest from its group consumer."""
    read = 0
    try:
        for record in read_versions(settings, timeout_s=timeout_s):
            see(record)
            read += 1
    except StreamError as exc:
        log.warning("replay of the models topic incomplete (%d read): %s", read, exc)
    log.info("replayed %d model versions", read)
    return read
