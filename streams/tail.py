"""Reading a topic back as decoded records (``tide tail``)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

from infra.errors import StreamError
from infra.settings import CommonSettings
from schemas import codec
from streams.kafka import reader_from_beginning
from streams.topics import TOPICS, topic


def _printable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value), "base64": base64.b64encode(value[:64]).decode()}
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def tail(
    settings: CommonSettings, name: str, *, max_records: int | None = None, idle_s: float = 2.0
) -> Iterator[dict[str, Any]]:
    """Yield records of topic ``name`` (short name) from the beginning, decoded, with their position.

    Stops after ``max_records`` or once nothing arrived for ``idle_s`` seconds (0 follows forever).
    Dead letters are shown with their headers and the raw value.
    """
    if name not in TOPICS:
        raise StreamError(f"unknown topic {name!r}; one of {', '.join(TOPICS)}")
    spec = TOPICS[name]
    consumer = reader_from_beginning(settings, topic(settings, name), spec.partitions)
    seen = 0
    last = time.monotonic()
    try:
        while max_records is None or seen < max_records:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                if idle_s and time.monotonic() - last > idle_s:
                    return
                continue
            last = time.monotonic()
            seen += 1
            out: dict[str, Any] = {
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": (msg.key() or b"").decode(errors="replace"),
            }
            raw = msg.value() or b""
            if spec.record is None:
                headers: list[tuple[str, bytes | None]] = msg.headers() or []  # type: ignore[assignment]
                out["headers"] = {k: (v or b"").decode(errors="replace") for k, v in headers}
                out["value"] = _printable(raw)
            else:
                try:
                    out["value"] = _printable(codec.decode(raw, spec.record))
                except Exception as exc:
                    out["error"] = str(exc)
            yield out
    finally:
        consumer.close()
