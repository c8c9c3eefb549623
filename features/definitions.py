"""Feature definitions: what is aggregated, per which entity, over which window.

Definitions are declared once, in ``features/views.toml``, and validated when loaded: an error names
the view, the feature and the key at fault. The stream processor, serving, point-in-time replay and the
Flink job all compute them with the same code (:mod:`features.aggregations`, :mod:`features.tiles`).

Windows (every kind is kept as partial aggregates per time tile, merged at read time):

- ``sliding``: the last ``window`` at ``tile`` granularity (the tiles whose start lies in
  ``(now - window, now]``); a hopping window of size ``window`` and hop ``tile``, evaluated at the
  current hop, is the same computation, so ``hopping`` is accepted as a synonym;
- ``tumbling``: the current calendar-aligned window of size ``window`` (one tile);
- ``lifetime``: everything since the entity was first seen (one tile).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from infra.errors import FeatureError
from schemas import codec

AggKind = Literal["count", "sum", "mean", "min", "max", "stddev", "last", "distinct", "quantile"]
WindowKind = Literal["sliding", "hopping", "tumbling", "lifetime"]
NUMERIC_KINDS = frozenset({"sum", "mean", "min", "max", "stddev", "quantile"})
KINDS = frozenset({"count", "last", "distinct"}) | NUMERIC_KINDS
WINDOW_KINDS = frozenset({"sliding", "hopping", "tumbling", "lifetime"})
LIFETIME_TILE = 0  # the one tile of a lifetime window
DEFINITIONS_FILE = Path(__file__).with_name("views.toml")

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_NUMERIC_AVRO = {"int", "long", "float", "double", "boolean"}


def duration_ms(text: str, where: str) -> int:
    match = _DURATION.match(str(text).strip())
    if not match:
        raise FeatureError(f"{where}: {text!r} is not a duration like 500ms, 30s, 5m, 1h or 7d")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


@dataclass(frozen=True)
class Aggregation:
    """One feature: an aggregation of one source field (none for ``count``)."""

    name: str
    kind: AggKind
    field: str | None = None
    default: float | str | None = 0.0  # served when the window holds no event
    q: float | None = None  # the quantile, for ``quantile``


@dataclass(frozen=True)
class FeatureView:
    """Windowed per-entity aggregations of one source topic, kept as partial aggregates per time tile."""

    name: str
    entity: str
    source: str
    event_time: str
    window_ms: int
    tile_ms: int
    aggregations: tuple[Aggregation, ...]
    kind: WindowKind = "sliding"
    allowed_lateness_ms: int = 0
    ttl_ms: int | None = None  # values of an entity idle for longer are expired; None: never
    description: str = ""
    source_fields: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = f"feature view {self.name!r}"
        if not _NAME.match(self.name):
            raise FeatureError(f"{where}: name must be lower_snake_case")
        if self.kind not in WINDOW_KINDS:
            raise FeatureError(f"{where}: window kind {self.kind!r} is not one of {sorted(WINDOW_KINDS)}")
        if self.kind != "lifetime" and (self.tile_ms <= 0 or self.window_ms % self.tile_ms):
            raise FeatureError(f"{where}: window must be a positive multiple of tile")
        if self.kind == "tumbling" and self.tile_ms != self.window_ms:
            raise FeatureError(f"{where}: a tumbling window is one tile (tile = window)")
        if self.allowed_lateness_ms < 0 or (self.ttl_ms is not None and self.ttl_ms <= 0):
            raise FeatureError(f"{where}: allowed_lateness must be >= 0 and ttl > 0")
        names = [a.name for a in self.aggregations]
        if not names:
            raise FeatureError(f"{where}: declares no features")
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise FeatureError(f"{where}: feature names must be unique, repeated: {dupes}")
        for agg in self.aggregations:
            self._check(agg)

    def _check(self, agg: Aggregation) -> None:
        where = f"feature view {self.name!r}, feature {agg.name!r}"
        if not _NAME.match(agg.name):
            raise FeatureError(f"{where}: name must be lower_snake_case")
        if agg.kind not in KINDS:
            raise FeatureError(f"{where}: unknown aggregation {agg.kind!r}; one of {sorted(KINDS)}")
        if agg.kind == "count":
            if agg.field is not None:
                raise FeatureError(f"{where}: count takes no field")
            return
        if agg.field is None:
            raise FeatureError(f"{where}: {agg.kind} needs a field")
        if self.source_fields:
            avro = self.source_fields.get(agg.field)
            if avro is None:
                raise FeatureError(f"{where}: field {agg.field!r} is not in the {self.source!r} records")
            if agg.kind in NUMERIC_KINDS and avro not in _NUMERIC_AVRO:
                raise FeatureError(f"{where}: {agg.kind} needs a numeric field, {agg.field!r} is {avro}")
        if agg.kind == "quantile" and not (agg.q is not None and 0 < agg.q < 1):
            raise FeatureError(f"{where}: quantile needs q between 0 and 1")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.aggregations)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "window_ms": None if self.kind == "lifetime" else self.window_ms,
            "tile_ms": None if self.kind == "lifetime" else self.tile_ms,
        }


def _avro_fields(record: str) -> dict[str, str]:
    """Field name -> Avro type name (the non-null branch of a nullable union) of a record's schema."""
    out = {}
    for f in codec.schema(record)["fields"]:
        t = f["type"]
        if isinstance(t, list):
            t = next((b for b in t if b != "null"), "null")
        out[f["name"]] = t if isinstance(t, str) else t.get("type", "record")
    return out


def load(path: Path = DEFINITIONS_FILE) -> dict[str, FeatureView]:
    """Load and validate the views declared in a TOML file."""
    from streams.topics import TOPICS  # the topic registry is plain data; imported late to stay light

    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FeatureError(f"{path}: {exc}") from None
    views: dict[str, FeatureView] = {}
    for i, raw in enumerate(doc.get("view", [])):
        name = raw.get("name", f"#{i}")
        where = f"{path.name}: feature view {name!r}"
        known = {
            "name",
            "entity",
            "source",
            "event_time",
            "window",
            "tile",
            "kind",
            "allowed_lateness",
            "ttl",
            "description",
            "features",
        }
        if unknown := sorted(set(raw) - known):
            raise FeatureError(f"{where}: unknown keys {unknown}")
        for key in ("entity", "source", "event_time", "features"):
            if key not in raw:
                raise FeatureError(f"{where}: missing key {key!r}")
        source = raw["source"]
        record = TOPICS[source].record if source in TOPICS else None
        if record is None:
            raise FeatureError(f"{where}: source {source!r} is not a topic of Avro records")
        fields = _avro_fields(record)
        for key in ("entity", "event_time"):
            if raw[key] not in fields:
                raise FeatureError(f"{where}: {key} {raw[key]!r} is not a field of {source!r} records")
        kind = raw.get("kind", "sliding")
        window = 0 if kind == "lifetime" else duration_ms(raw.get("window", ""), f"{where}: window")
        tile = window if kind == "tumbling" else duration_ms(raw.get("tile", "1m"), f"{where}: tile")
        aggs = []
        for j, feat in enumerate(raw["features"]):
            fwhere = f"{where}, feature {feat.get('name', f'#{j}')!r}"
            if unknown := sorted(set(feat) - {"name", "agg", "field", "default", "q"}):
                raise FeatureError(f"{fwhere}: unknown keys {unknown}")
            if "name" not in feat or "agg" not in feat:
                raise FeatureError(f"{fwhere}: needs 'name' and 'agg'")
            default = feat.get(
                "default", 0.0 if feat["agg"] not in ("last", "min", "max", "quantile") else None
            )
            aggs.append(Aggregation(feat["name"], feat["agg"], feat.get("field"), default, feat.get("q")))
        views[name] = FeatureView(
            name=name,
            entity=raw["entity"],
            source=source,
            event_time=raw["event_time"],
            window_ms=window,
            tile_ms=tile if kind != "lifetime" else 0,
            aggregations=tuple(aggs),
            kind=kind,
            allowed_lateness_ms=duration_ms(raw.get("allowed_lateness", "0s"), f"{where}: allowed_lateness"),
            ttl_ms=duration_ms(raw["ttl"], f"{where}: ttl") if "ttl" in raw else None,
            description=raw.get("description", ""),
            source_fields=fields,
        )
    if not views:
        raise FeatureError(f"{path}: declares no [[view]]")
    return views


VIEWS: dict[str, FeatureView] = load()
CARD_ACTIVITY = VIEWS["card_activity"]
