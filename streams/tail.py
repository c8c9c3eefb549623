"""Reading a topic back as decoded records (``tide tail``): any of Tide's own topics, or any source of
the project, named by the source's name or its topic."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Message

from infra.errors import StreamError
from infra.kafka import messages, read_to_end, reader_from_beginning
from infra.settings import CommonSettings
from infra.topics import TOPICS, prefixed, topic
from schemas import codec
from schemas.definitions import Project
from streams.sources import find_source


def _printable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value), "base64": base64.b64encode(value[:64]).decode()}
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def decoded(msg: Message, record: str | None) -> dict[str, Any]:
    """A record with its position, decoded; dead letters with their headers and the raw value."""
    out: dict[str, Any] = {
        "partition": msg.partition(),
        "offset": msg.offset(),
        "key": (msg.key() or b"").decode(errors="replace"),
    }
    raw = msg.value() or b""
    if record is None:
        headers: list[tuple[str, bytes | None]] = msg.headers() or []  # type: ignore[assignment]
        out["headers"] = {k: (v or b"").decode(errors="replace") for k, v in headers}
        out["value"] = _printable(raw)
    else:
        try:
            out["value"] = _printable(codec.decode(raw, record))
        except Exception as exc:
            out["error"] = str(exc)
    return out


def resolve(settings: CommonSettings, name: str, project: Project | None) -> tuple[str, int, str | None]:
    """(full topic name, partitions, record name or None for raw) of ``name``: one of Tide's own topics
    (:data:`infra.topics.TOPICS`), else a source of ``project`` by name or by topic."""
    spec = TOPICS.get(name)
    if spec is not None:
        return topic(settings, name), spec.partitions, spec.record
    if project is None:
        raise StreamError(f"unknown topic {name!r}; Tide's topics: {', '.join(TOPICS)}")
    source = find_source(project, name)
    return prefixed(settings, source.topic_name), source.partitions, source.name


def tail(
    settings: CommonSettings,
    name: str,
    *,
    project: Project | None = None,
    max_records: int | None = None,
    follow: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield records of ``name`` from the beginning, decoded, with their position.

    ``name`` is one of Tide's topics (short name) or, with ``project``, a source's name or topic (its
    records decode with every schema version the registry holds). Stops at the topic's current end, or
    after ``max_records``; with ``follow`` it waits for more.
    """
    full, partitions, record = resolve(settings, name, project)
    if max_records is not None and max_records <= 0:
        return
    if not follow:
        yield from _decoded(read_to_end(settings, full, partitions), record, max_records)
        return
    consumer = reader_from_beginning(settings, full, partitions)
    try:
        yield from _decoded((m for batch in messages(consumer) for m in batch), record, max_records)
    finally:
        consumer.close()


def _decoded(
    source: Iterator[Message], record: str | None, max_records: int | None
) -> Iterator[dict[str, Any]]:
    for seen, msg in enumerate(source, 1):
        yield decoded(msg, record)
        if max_records is not None and seen >= max_records:
            return
