"""Reading a topic back as decoded records (``tide tail``)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Message

from infra.errors import StreamError
from infra.settings import CommonSettings
from schemas import codec
from infra.kafka import messages, read_to_end, reader_from_beginning
from infra.topics import TOPICS, topic


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


def tail(
    settings: CommonSettings, name: str, *, max_records: int | None = None, follow: bool = False
) -> Iterator[dict[str, Any]]:
    """Yield records of topic ``name`` (short name) from the beginning, decoded, with their position.

    Stops at the topic's current end, or after ``max_records``; with ``follow`` it waits for more.
    """
    if name not in TOPICS:
        raise StreamError(f"unknown topic {name!r}; one of {', '.join(TOPICS)}")
    spec = TOPICS[name]
    full = topic(settings, name)
    if follow:
        consumer = reader_from_beginning(settings, full, spec.partitions)
        source: Iterator[Message] = (m for batch in messages(consumer) for m in batch)
    else:
        source = read_to_end(settings, full, spec.partitions)
    for seen, msg in enumerate(source, 1):
        yield decoded(msg, spec.record)
        if max_records is not None and seen >= max_records:
            return
