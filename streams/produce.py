"""Producing records to a project's source (``tide produce SOURCE --file F``): all of a file, or nothing.

Every record is checked against the source's current schema (registered in the codec by
``schemas.registry.load``): fields left out take their schema defaults, every value must have its
field's type, numbers must be finite (NaN and +/-Infinity are refused: one would poison every aggregate
it reaches) and the source's ``key`` field must hold a value, since records are keyed by it (one
entity's records stay in order on one partition).

:func:`produce_file` reads and checks the whole file first (:mod:`streams.files` reads JSON Lines, CSV
and Avro). When any record is bad, each one is reported with its line number (record number in an Avro
file) and the reason, and nothing is sent. Otherwise the records, spooled to a temporary file as they
were encoded (memory stays flat however long the file), are produced with an idempotent producer and
flushed: what is reported as produced is in the log. :class:`SourceProducer` is the same check and
keyed, idempotent send for records that come from code.
"""

from __future__ import annotations

import logging
import math
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from confluent_kafka import KafkaError, Message

from infra.errors import SchemaError, StreamError
from infra.kafka import make_producer
from infra.settings import CommonSettings
from infra.topics import prefixed
from schemas import codec
from schemas.definitions import Source
from streams.files import detect_format, read_file

log = logging.getLogger(__name__)

_SPOOLED = struct.Struct(">II")  # key length, value length
_TICK_EVERY = 512  # records between two looks at the clock for progress
MAX_LISTED = 100  # rejected records listed in the summary (every one goes to on_rejected)


@dataclass(frozen=True)
class Rejected:
    """A bad record: where it is in the file (``unit`` ``line``, or ``record`` in an Avro file) and why."""

    number: int
    error: str
    unit: str = "line"

    def as_dict(self) -> dict[str, Any]:
        return {self.unit: self.number, "error": self.error}

    def __str__(self) -> str:
        return f"{self.unit} {self.number}: {self.error}"


@dataclass(frozen=True)
class Progress:
    """How far :func:`produce_file` is: ``phase`` ``checked`` (reading the file) or ``produced``."""

    source: str
    phase: str
    done: int
    elapsed_s: float
    total: int | None = None  # known while producing
    rejected: int = 0

    def __str__(self) -> str:
        of = f"/{self.total:,}" if self.total is not None else ""
        bad = f" ({self.rejected:,} rejected)" if self.rejected else ""
        rate = f", {self.done / self.elapsed_s:,.0f}/s" if self.elapsed_s > 0 else ""
        done = f"{self.phase} {self.done:,}{of} records{bad}"
        return f"produce {self.source}: {done} in {self.elapsed_s:.1f} s{rate}"


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The path and value of the first NaN or infinite number in ``value``, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _non_finite(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def encode_record(source: Source, record: Mapping[str, Any], *, validate: bool = True) -> tuple[bytes, bytes]:
    """``(key, payload)`` of ``record`` for ``source``'s topic: checked and encoded with the source's
    current schema, keyed by its ``key`` field. Raises :class:`SchemaError` naming the field at fault.

    ``validate=False`` skips the checks (see :func:`schemas.codec.encode`): for trusted, generated
    records only (benchmarks, drivers), never for records from outside.
    """
    if not isinstance(record, Mapping):
        raise SchemaError(f"expected a record, got {type(record).__name__}")
    full = dict(record)
    for field in codec.schema(source.name)["fields"]:
        if field["name"] not in full and "default" in field:
            full[field["name"]] = field["default"]
    if validate:
        bad = _non_finite(full, "")
        if bad is not None:
            raise SchemaError(
                f"field {bad[0]!r}: {bad[1]} is not a finite number (NaN and Infinity are refused)"
            )
    payload = codec.encode(source.name, full, validate=validate)
    key = full.get(source.key)
    if key is None:
        raise SchemaError(f"field {source.key!r} is null: the source's records are keyed by it")
    return str(key).encode(), payload


class SourceProducer:
    """Sends records of one source to its topic (under the settings' prefix), keyed by the source's
    ``key`` field, with an idempotent producer (acks=all). :meth:`flush` raises unless every record sent
    was acknowledged. ``last_offset`` holds the highest acknowledged offset per partition.
    ``validate=False`` is for trusted, generated records only (see :func:`encode_record`);
    ``producer_config`` overrides the client's configuration (``linger.ms``, ...)."""

    def __init__(
        self, settings: CommonSettings, source: Source, *, validate: bool = True, **producer_config: Any
    ) -> None:
        self.source = source
        self._validate = validate
        self.topic = prefixed(settings, source.topic_name)
        self._producer = make_producer(settings, **producer_config)
        self.sent = 0
        self.failed = 0
        self.errors: list[str] = []
        self.last_offset: dict[int, int] = {}

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed += 1
            if len(self.errors) < 10:
                self.errors.append(str(err))
            log.error("delivery to %s failed: %s", msg.topic(), err)
            return
        partition, offset = msg.partition() or 0, msg.offset() or 0
        if offset > self.last_offset.get(partition, -1):
            self.last_offset[partition] = offset

    def send(self, record: Mapping[str, Any]) -> None:
        """Check and send one record (raises :class:`SchemaError` before sending a bad one)."""
        key, payload = encode_record(self.source, record, validate=self._validate)
        self.send_encoded(key, payload)

    def send_encoded(self, key: bytes, payload: bytes) -> None:
        """Send a record :func:`encode_record` encoded."""
        while True:
            try:
                self._producer.produce(self.topic, key=key, value=payload, on_delivery=self._on_delivery)
                break
            except BufferError:  # the local queue is full: let deliveries drain it, then retry
                self._producer.poll(0.05)
        self._producer.poll(0)
        self.sent += 1

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait for every record sent to be acknowledged; raises :class:`StreamError` if any was not."""
        left = self._producer.flush(timeout_s)
        if left:
            raise StreamError(f"{left} records to {self.topic} still unacknowledged after {timeout_s:.0f} s")
        if self.failed:
            raise StreamError(
                f"{self.failed} records to {self.topic} failed delivery: {'; '.join(self.errors)}"
            )


class _Ticker:
    """Calls ``on_progress`` at most every ``every_s`` seconds, and at the end of each phase."""

    def __init__(self, source: str, on_progress: Callable[[Progress], None] | None, every_s: float) -> None:
        self._source = source
        self._on_progress = on_progress
        self._every_s = every_s
        self._started = self._last = time.monotonic()

    def restart(self) -> None:
        self._started = self._last = time.monotonic()

    def tick(
        self, phase: str, done: int, total: int | None = None, rejected: int = 0, *, end: bool = False
    ) -> None:
        if self._on_progress is None or (not end and done % _TICK_EVERY):
            return
        now = time.monotonic()
        if end or now - self._last >= self._every_s:
            self._last = now
            self._on_progress(Progress(self._source, phase, done, now - self._started, total, rejected))


def _spool(out: IO[bytes], key: bytes, payload: bytes) -> None:
    out.write(_SPOOLED.pack(len(key), len(payload)))
    out.write(key)
    out.write(payload)


def _unspool(spool: IO[bytes]) -> Iterator[tuple[bytes, bytes]]:
    spool.seek(0)
    while header := spool.read(_SPOOLED.size):
        key_len, value_len = _SPOOLED.unpack(header)
        yield spool.read(key_len), spool.read(value_len)


def produce_file(
    settings: CommonSettings,
    source: Source,
    path: Path,
    *,
    fmt: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_rejected: Callable[[Rejected], None] | None = None,
    progress_every_s: float = 1.0,
) -> dict[str, Any]:
    """Check every record of ``path`` (format ``fmt``, else told by its name), then produce them all
    to ``source``'s topic, or none when any is bad. Returns a summary; ``rejected`` lists the first
    :data:`MAX_LISTED` bad records, ``on_rejected`` hears of each one as it is found."""
    fmt = detect_format(path, fmt)
    unit = "record" if fmt == "avro" else "line"
    schema = codec.schema(source.name)
    ticker = _Ticker(source.name, on_progress, progress_every_s)
    started = time.monotonic()
    rejected: list[Rejected] = []
    rejected_count = good = produced = 0
    topic = prefixed(settings, source.topic_name)
    with tempfile.TemporaryFile(prefix="tide-produce-") as spool:
        for line in read_file(path, fmt, schema):
            error = line.error
            if error is None and line.record is not None:
                try:
                    key, payload = encode_record(source, line.record)
                except SchemaError as exc:
                    error = str(exc)
            if error is not None:
                bad = Rejected(line.number, error, unit)
                rejected_count += 1
                if len(rejected) < MAX_LISTED:
                    rejected.append(bad)
                if on_rejected is not None:
                    on_rejected(bad)
            else:
                good += 1
                if not rejected_count:  # once one is bad nothing is sent: stop spooling, keep checking
                    _spool(spool, key, payload)
            ticker.tick("checked", good + rejected_count, rejected=rejected_count)
        ticker.tick("checked", good + rejected_count, rejected=rejected_count, end=True)
        if rejected_count:
            log.error("%s: %d bad records in %s; nothing produced", source.name, rejected_count, path)
        else:
            ticker.restart()
            producer = SourceProducer(settings, source)
            for key, payload in _unspool(spool):
                producer.send_encoded(key, payload)
                ticker.tick("produced", producer.sent, good)
            producer.flush()
            produced = producer.sent
            ticker.tick("produced", produced, good, end=True)
    seconds = time.monotonic() - started
    return {
        "source": source.name,
        "topic": topic,
        "file": str(path),
        "format": fmt,
        "records": good + rejected_count,
        "produced": produced,
        "rejected_count": rejected_count,
        "rejected": [r.as_dict() for r in rejected],
        "seconds": round(seconds, 3),
        "records_per_s": round(produced / seconds, 1) if produced and seconds > 0 else None,
    }
