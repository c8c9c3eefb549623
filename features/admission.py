"""Which source records the feature views may fold in, decided before lateness.

A decoded record is admitted when every field the views of its source read holds a usable value:

- the event time is an integer (ms since the epoch) at most the source's ``max_future_skew`` ahead of
  the wall clock: an event from the future would move its partition's watermark, and every later event
  would then be dropped as late;
- each entity key (a view's join key) is a string or an integer;
- each field of a numeric aggregation (sum, mean, min, max, stddev, quantile) is a finite number: NaN
  or an infinity would poison every window it falls in (and cannot be put in a quantile bucket);
- each field of a ``last`` or ``distinct`` aggregation is present (null is a value there).

Anything else is a poison record: it goes to the dead-letter topic with the reason, is not folded into
any view, does not move the watermark, and its position is taken. The check is per record and the same
for every view of the source, so the online processor, the Flink job and the point-in-time replay
admit the same records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.definitions import NUMERIC_KINDS, FeatureView

FUTURE_EVENT = "FutureEvent"
MISSING_FIELD = "MissingField"
WRONG_TYPE = "WrongType"
NON_FINITE = "NonFiniteValue"


@dataclass(frozen=True)
class Rejection:
    """Why a record is not admitted: ``error_type`` (the dead letter's ``tide.error_type``) and a reason
    naming the field and the view that reads it."""

    error_type: str
    reason: str


def _readers(views: Sequence[FeatureView], wanted: set[str] | frozenset[str] | None) -> dict[str, str]:
    """Field -> the first view (and feature) that reads it, for reasons; ``wanted``: those kinds only."""
    out: dict[str, str] = {}
    for view in views:
        for agg in view.aggregations:
            if agg.field is not None and (wanted is None or agg.kind in wanted):
                out.setdefault(agg.field, f"read by view {view.name!r} ({agg.name}: {agg.kind})")
    return out


class Admission:
    """The admission check of one source, compiled from the views that read it.

    ``future_skew_ms`` is the source's ``max_future_skew``; ``None`` turns the future check off (a
    replay of old records, where the wall clock of the time they were processed is not known).
    """

    def __init__(self, views: Sequence[FeatureView], future_skew_ms: int | None) -> None:
        if not views:
            raise ValueError("an admission check needs the views of a source")
        self.source = views[0].source_name
        self.event_time = views[0].event_time
        self.future_skew_ms = future_skew_ms
        self.time_reader = f"the event time of source {self.source!r} (ms since the epoch)"
        self.keys: dict[str, str] = {}
        for view in views:
            self.keys.setdefault(view.entity_key, f"the entity key of view {view.name!r}")
        numeric = _readers(views, NUMERIC_KINDS)
        self.numeric = tuple(numeric.items())
        self.present = tuple((f, w) for f, w in _readers(views, None).items() if f not in numeric)
        self.key_fields = tuple(self.keys.items())

    @classmethod
    def of_source(cls, views: Sequence[FeatureView], *, future: bool = True) -> Admission:
        """The check of the source of ``views`` (all of one source), with its declared future skew."""
        return cls(views, views[0].source.future_skew_ms if future and views else None)

    def check(self, event: Mapping[str, Any], now_ms: int | None = None) -> Rejection | None:
        """None when ``event`` may be folded in; else why not. ``now_ms``: the wall clock (ms), for the
        future check (skipped when None)."""
        field = self.event_time
        ts = event.get(field)
        if type(ts) is not int:
            return self._bad(event, field, ts, self.time_reader, "integer")
        if now_ms is not None and self.future_skew_ms is not None and ts > now_ms + self.future_skew_ms:
            return Rejection(
                FUTURE_EVENT,
                f"event time {ts} (field {field!r}) is {ts - now_ms} ms ahead of the wall clock; source "
                f"{self.source!r} allows {self.future_skew_ms} ms (max_future_skew): it would move the "
                "partition's watermark and make every later event late",
            )
        for field, reader in self.key_fields:
            value = event.get(field)
            kind = type(value)
            if kind is not str and kind is not int:
                return self._bad(event, field, value, reader, "string or integer")
        for field, reader in self.numeric:
            value = event.get(field)
            kind = type(value)
            if kind is float:
                if not math.isfinite(value):  # type: ignore[arg-type]
                    return Rejection(
                        NON_FINITE, f"field {field!r} is {value!r}, not a finite number; it is {reader}"
                    )
            elif kind is not int and kind is not bool:
                return self._bad(event, field, value, reader, "number")
        for field, reader in self.present:
            if field not in event:
                return self._bad(event, field, None, reader, "value")
        return None

    @staticmethod
    def _bad(event: Mapping[str, Any], field: str, value: Any, reader: str, wanted: str) -> Rejection:
        if value is None:
            missing = "missing" if field not in event else "null"
            return Rejection(MISSING_FIELD, f"field {field!r} is {missing}; it is {reader}")
        return Rejection(
            WRONG_TYPE,
            f"field {field!r} is a {type(value).__name__} ({value!r:.40}), not a {wanted}; it is {reader}",
        )
