"""Project definitions: the sources, entities, feature views, labels and models a team declares.

A project is a folder of Python files whose module-level objects are these definitions (the convention
of Feast, Tecton and Fennel). They are plain, validated data with no heavy imports: every service gets
them from the registry (a JSON document, :meth:`Project.to_dict`), never from the project's files.

- :class:`Source`: a Kafka topic of the team's own Avro records (every schema version kept), the field
  its records are keyed by and the field holding their event time.
- :class:`Entity`: what features are kept per (a user, a device, a store), by its join key.
- :class:`FeatureView`: windowed aggregations of one source per entity. Windows (all kept as partial
  aggregates per time tile, merged at read time): ``sliding`` (the last ``window`` at ``tile``
  granularity; ``hopping`` is a synonym), ``tumbling`` (the current calendar-aligned window, one tile),
  ``lifetime`` (everything since the entity was first seen).
- :class:`Labels`: the source that carries ground truth, the key that joins it to the scored events,
  the target field, the task and the expected delay.
- :class:`Model`: the request fields it is scored on, the ``view.feature`` references it reads, its
  labels and learners (import paths ``"module:factory"``), its metric and what is monitored for drift.

Every error names the file, the object and the field at fault (:class:`infra.errors.DefinitionError`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from infra.errors import DefinitionError, UnknownViewVersion
from schemas.policy import Policy

AggKind = Literal["count", "sum", "mean", "min", "max", "stddev", "last", "distinct", "quantile"]
WindowKind = Literal["sliding", "hopping", "tumbling", "lifetime"]
Task = Literal["binary", "multiclass", "regression"]
NUMERIC_KINDS = frozenset({"sum", "mean", "min", "max", "stddev", "quantile"})
KINDS = frozenset(get_args(AggKind))
WINDOW_KINDS = frozenset(get_args(WindowKind))
TASKS = frozenset(get_args(Task))
LIFETIME_TILE = 0  # the one tile of a lifetime window
# Names of Tide's own records and topics: a source may not take them.
RESERVED = frozenset(
    {"prediction", "model_version", "deployment", "drift_alert", "definitions", "predictions", "models"}
    | {"deployments", "drift-alerts", "dead-letter", "registry", "canary_verdict", "canary-verdicts"}
    | {"checkpoint", "checkpoints"}
)
DEFAULT_METRIC: dict[str, str] = {"binary": "ROCAUC", "multiclass": "Accuracy", "regression": "MAE"}

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]+$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
NUMERIC_AVRO = frozenset({"int", "long", "float", "double", "boolean"})
PRIMITIVE_AVRO = NUMERIC_AVRO | {"string"}
_SKEW_DEFAULT = 3_600_000


def duration_ms(value: str | int, where: str) -> int:
    """Milliseconds of ``500ms``, ``30s``, ``5m``, ``1h``, ``7d`` (or an int, already milliseconds)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _DURATION.match(str(value).strip())
    if not match:
        raise DefinitionError(f"{where}: {value!r} is not a duration like 500ms, 30s, 5m, 1h or 7d")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def _instant_ms(value: str | int | None, where: str) -> int | None:
    """Ms since the epoch of an ISO date or datetime (UTC unless it names a zone) or of an int (ms)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    try:
        instant = datetime.fromisoformat(str(value))
    except ValueError:
        raise DefinitionError(
            f"{where}: {value!r} is not an ISO date or datetime, nor ms since the epoch"
        ) from None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return int(instant.timestamp() * 1000)


def _name(value: Any, where: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise DefinitionError(f"{where}: name must be lower_snake_case, got {value!r}")


def avro_fields(schema: Mapping[str, Any]) -> dict[str, str]:
    """Field name -> Avro type name of a record schema (the non-null branch of a nullable union)."""
    out = {}
    for f in schema.get("fields", ()):
        t = f["type"]
        if isinstance(t, list):
            t = next((b for b in t if b != "null"), "null")
        out[f["name"]] = t if isinstance(t, str) else t.get("type", "record")
    return out


def nullable(schema: Mapping[str, Any], name: str) -> bool:
    """Whether field ``name`` of a record schema admits null."""
    for f in schema.get("fields", ()):
        if f["name"] == name:
            return isinstance(f["type"], list) and "null" in f["type"]
    return False


META = ("description", "owner", "tags")  # what a definition says about itself: changing it touches nothing


def _check_meta(obj: Any, where: str) -> None:
    """``owner`` is a string, ``tags`` a mapping of strings (stored as a plain dict)."""
    if not isinstance(obj.description, str) or not isinstance(obj.owner, str):
        raise DefinitionError(f"{where}, fields 'description' and 'owner': must be strings")
    tags = obj.tags
    if not isinstance(tags, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise DefinitionError(f"{where}, field 'tags': must map strings to strings, got {tags!r}")
    object.__setattr__(obj, "tags", dict(sorted(tags.items())))


def _meta(obj: Any) -> dict[str, Any]:
    """The metadata part of a definition's canonical form (owner and tags only when set)."""
    out: dict[str, Any] = {"description": obj.description}
    if obj.owner:
        out["owner"] = obj.owner
    if obj.tags:
        out["tags"] = dict(obj.tags)
    return out


def _meta_args(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in META if k in d}


@dataclass(frozen=True)
class Source:
    """A topic of the team's own Avro records.

    ``schema`` is the path of an ``.avsc`` file (relative to the file that declares the source) or the
    parsed schema; ``history`` holds the earlier versions registered (oldest first, kept by the
    registry so old records stay readable). ``key`` is the field records are keyed (partitioned) by;
    ``event_time`` the field with the event time in ms since the epoch. Events stamped more than
    ``max_future_skew`` ahead of the wall clock are dead letters: they would move the watermark.
    """

    name: str
    schema: str | Mapping[str, Any]
    key: str
    event_time: str
    topic: str | None = None
    partitions: int = 4
    max_future_skew: str | int = "1h"
    description: str = ""
    history: tuple[Mapping[str, Any], ...] = ()
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"source {self.name!r}"
        _name(self.name, where)
        _check_meta(self, where)
        if self.name in RESERVED:
            raise DefinitionError(f"{where}: the name is reserved for Tide's own records")
        if self.topic is not None and not _TOPIC.match(self.topic):
            raise DefinitionError(f"{where}, field 'topic': {self.topic!r} is not a valid topic name")
        if self.topic in RESERVED:
            raise DefinitionError(f"{where}, field 'topic': {self.topic!r} is one of Tide's own topics")
        if not isinstance(self.partitions, int) or not 1 <= self.partitions <= 1024:
            raise DefinitionError(f"{where}, field 'partitions': must be an integer in 1..1024")
        duration_ms(self.max_future_skew, f"{where}, field 'max_future_skew'")
        if isinstance(self.schema, Mapping):
            self.check_schema()

    def __hash__(self) -> int:
        return hash(("source", self.name))

    @property
    def topic_name(self) -> str:
        """The topic (before the deployment's prefix)."""
        return self.topic or self.name

    @property
    def future_skew_ms(self) -> int:
        return duration_ms(self.max_future_skew, f"source {self.name!r}")

    @property
    def parsed(self) -> Mapping[str, Any]:
        """The current schema; raises if the project loader has not resolved the file yet."""
        if not isinstance(self.schema, Mapping):
            raise DefinitionError(f"source {self.name!r}: schema file {self.schema!r} is not loaded")
        return self.schema

    @property
    def versions(self) -> tuple[Mapping[str, Any], ...]:
        """Every schema version, oldest first; the last is the current one."""
        return (*self.history, self.parsed)

    @property
    def fields(self) -> dict[str, str]:
        return avro_fields(self.parsed)

    def check_schema(self) -> None:
        where = f"source {self.name!r}, field 'schema'"
        schema = self.parsed
        if schema.get("type") != "record" or not isinstance(schema.get("fields"), list):
            raise DefinitionError(f"{where}: must be an Avro record schema")
        fields = self.fields
        for attr in ("key", "event_time"):
            value = getattr(self, attr)
            if value not in fields:
                raise DefinitionError(
                    f"source {self.name!r}, field {attr!r}: {value!r} is not a field of the schema "
                    f"(fields: {', '.join(fields)})"
                )
        if fields[self.event_time] not in ("long", "int"):
            raise DefinitionError(
                f"source {self.name!r}, field 'event_time': {self.event_time!r} must be a long "
                f"(ms since the epoch), it is {fields[self.event_time]}"
            )
        if fields[self.key] not in ("string", "long", "int"):
            raise DefinitionError(f"source {self.name!r}, field 'key': {self.key!r} must be a string or int")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "topic": self.topic_name,
            "partitions": self.partitions,
            "key": self.key,
            "event_time": self.event_time,
            "max_future_skew_ms": self.future_skew_ms,
            **_meta(self),
            "schemas": [dict(s) for s in self.versions],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Source:
        schemas = list(d["schemas"])
        return cls(
            name=d["name"],
            schema=schemas[-1],
            key=d["key"],
            event_time=d["event_time"],
            topic=d["topic"],
            partitions=d["partitions"],
            max_future_skew=d["max_future_skew_ms"],
            history=tuple(schemas[:-1]),
            **_meta_args(d),
        )


@dataclass(frozen=True)
class Entity:
    """What features are kept per, found in records by its join key (a field name)."""

    name: str
    join_key: str
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _name(self.name, f"entity {self.name!r}")
        _check_meta(self, f"entity {self.name!r}")
        if not isinstance(self.join_key, str) or not self.join_key:
            raise DefinitionError(f"entity {self.name!r}, field 'join_key': must be a field name")

    def __hash__(self) -> int:
        return hash(("entity", self.name))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "join_key": self.join_key, **_meta(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Entity:
        return cls(d["name"], d["join_key"], **_meta_args(d))


_UNSET: Any = object()


@dataclass(frozen=True)
class Aggregation:
    """One feature: an aggregation of one source field (none for ``count``).

    ``default`` is served while the window holds no event: 0 for counts and sums, none for ``last``,
    ``min``, ``max`` and ``quantile``.
    """

    name: str
    kind: AggKind
    field: str | None = None
    default: float | int | str | None = _UNSET
    q: float | None = None

    def __post_init__(self) -> None:
        if self.default is _UNSET:
            default: float | int | None = None
            if self.kind in ("count", "distinct"):
                default = 0
            elif self.kind not in ("last", "min", "max", "quantile"):
                default = 0.0
            object.__setattr__(self, "default", default)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "agg": self.kind,
            "field": self.field,
            "default": self.default,
            "q": self.q,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Aggregation:
        return cls(d["name"], d["agg"], d.get("field"), d.get("default"), d.get("q"))


Feature = Aggregation  # the name definitions use: Feature("value_sum_1h", "sum", "value")


@dataclass(frozen=True)
class FeatureView:
    """Windowed per-entity aggregations of one source, kept as partial aggregates per time tile.

    Durations are strings (``30s``, ``5m``, ``1h``, ``7d``) or integers of milliseconds.
    """

    name: str
    source: Source
    entity: Entity
    features: Sequence[Aggregation]
    kind: WindowKind = "sliding"
    window: str | int | None = None
    tile: str | int | None = None
    allowed_lateness: str | int = 0
    ttl: str | int | None = None
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    # Assigned by ``tide apply``: the registry version that introduced what the view computes (a change
    # of computation takes the new registry version, so a number is never reused, not even by a view
    # removed and declared again). Each version has its own keys in the online store and is backfilled.
    version: int = 1
    # Where a new version's backfill starts: events from this event time on (an ISO date or datetime,
    # UTC when no zone is given, or ms since the epoch); None: the source topic's earliest retained offset.
    backfill_start: str | int | None = None
    # Derived from the fields above; what the engine reads.
    entity_key: str = field(init=False)
    source_name: str = field(init=False)
    event_time: str = field(init=False)
    window_ms: int = field(init=False)
    tile_ms: int = field(init=False)
    allowed_lateness_ms: int = field(init=False)
    ttl_ms: int | None = field(init=False)
    backfill_start_ms: int | None = field(init=False)
    aggregations: tuple[Aggregation, ...] = field(init=False)

    def __post_init__(self) -> None:
        where = f"feature view {self.name!r}"
        _name(self.name, where)
        _check_meta(self, where)
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise DefinitionError(f"{where}, field 'version': must be a positive integer")
        if not isinstance(self.source, Source):
            raise DefinitionError(f"{where}, field 'source': must be a Source, got {self.source!r}")
        if not isinstance(self.entity, Entity):
            raise DefinitionError(f"{where}, field 'entity': must be an Entity, got {self.entity!r}")
        if self.kind not in WINDOW_KINDS:
            raise DefinitionError(
                f"{where}, field 'kind': {self.kind!r} is not one of {sorted(WINDOW_KINDS)}"
            )
        if self.kind == "lifetime":
            window = tile = 0
        else:
            if self.window is None:
                raise DefinitionError(f"{where}, field 'window': a {self.kind} window needs a duration")
            window = duration_ms(self.window, f"{where}, field 'window'")
            tile = (
                window
                if self.kind == "tumbling"
                else duration_ms(self.tile or "1m", f"{where}, field 'tile'")
            )
            if tile <= 0 or window % tile:
                raise DefinitionError(f"{where}, field 'window': must be a positive multiple of tile")
            if self.kind == "tumbling" and self.tile is not None and duration_ms(self.tile, where) != window:
                raise DefinitionError(f"{where}, field 'tile': a tumbling window is one tile (tile = window)")
        ttl = None if self.ttl is None else duration_ms(self.ttl, f"{where}, field 'ttl'")
        if ttl is not None and ttl <= 0:
            raise DefinitionError(f"{where}, field 'ttl': must be > 0")
        derived = {
            "entity_key": self.entity.join_key,
            "source_name": self.source.name,
            "event_time": self.source.event_time,
            "window_ms": window,
            "tile_ms": tile,
            "allowed_lateness_ms": duration_ms(self.allowed_lateness, f"{where}, field 'allowed_lateness'"),
            "ttl_ms": ttl,
            "backfill_start_ms": _instant_ms(self.backfill_start, f"{where}, field 'backfill_start'"),
            "aggregations": tuple(self.features),
            "features": tuple(self.features),
        }
        for key, value in derived.items():
            object.__setattr__(self, key, value)
        names = [a.name for a in self.aggregations]
        if not names:
            raise DefinitionError(f"{where}, field 'features': declares no features")
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise DefinitionError(f"{where}, field 'features': names must be unique, repeated: {dupes}")
        for i, agg in enumerate(self.aggregations):
            self._check(i, agg)
        if isinstance(self.source.schema, Mapping):
            self.check_fields()

    def _check(self, i: int, agg: Any) -> None:
        where = f"feature view {self.name!r}, field 'features[{i}]'"
        if not isinstance(agg, Aggregation):
            raise DefinitionError(f"{where}: must be a Feature, got {agg!r}")
        _name(agg.name, where)
        if agg.kind not in KINDS:
            raise DefinitionError(f"{where}: unknown aggregation {agg.kind!r}; one of {sorted(KINDS)}")
        if agg.kind == "count":
            if agg.field is not None:
                raise DefinitionError(f"{where}: count takes no field")
            return
        if agg.field is None:
            raise DefinitionError(f"{where}: {agg.kind} needs a field")
        if agg.kind == "quantile" and not (agg.q is not None and 0 < agg.q < 1):
            raise DefinitionError(f"{where}: quantile needs q between 0 and 1")

    def check_fields(self) -> None:
        """Every field the view reads exists in its source's schema with a usable type."""
        fields = self.source.fields
        if self.entity_key not in fields:
            raise DefinitionError(
                f"feature view {self.name!r}, field 'entity': join key {self.entity_key!r} of entity "
                f"{self.entity.name!r} is not a field of source {self.source.name!r}"
            )
        for i, agg in enumerate(self.aggregations):
            if agg.field is None:
                continue
            where = f"feature view {self.name!r}, field 'features[{i}]' ({agg.name})"
            avro = fields.get(agg.field)
            if avro is None:
                raise DefinitionError(f"{where}: {agg.field!r} is not a field of source {self.source.name!r}")
            if agg.kind in NUMERIC_KINDS and avro not in NUMERIC_AVRO:
                raise DefinitionError(f"{where}: {agg.kind} needs a numeric field, {agg.field!r} is {avro}")
            if agg.kind in ("last", "distinct") and avro not in PRIMITIVE_AVRO:
                raise DefinitionError(f"{where}: {agg.kind} needs a primitive field, {agg.field!r} is {avro}")

    def __hash__(self) -> int:
        return hash(("view", self.name, self.version))

    @property
    def ref(self) -> str:
        """``name@version``: how the store, the registry and model lineage name this version."""
        return f"{self.name}@{self.version}"

    def computation(self) -> dict[str, Any]:
        """What the view computes (its canonical form without metadata and version): two versions of a
        view with the same computation hold the same values."""
        kept = {k: v for k, v in self.to_dict().items() if k not in (*META, "version")}
        return {**kept, "entity_key": self.entity_key, "event_time": self.event_time}

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.aggregations)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "window_ms": None if self.kind == "lifetime" else self.window_ms,
            "tile_ms": None if self.kind == "lifetime" else self.tile_ms,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source.name,
            "entity": self.entity.name,
            "kind": self.kind,
            "window_ms": self.window_ms,
            "tile_ms": self.tile_ms,
            "allowed_lateness_ms": self.allowed_lateness_ms,
            "ttl_ms": self.ttl_ms,
            **_meta(self),
            "version": self.version,
            **({"backfill_start_ms": self.backfill_start_ms} if self.backfill_start_ms is not None else {}),
            "features": [a.to_dict() for a in self.aggregations],
        }

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], sources: Mapping[str, Source], entities: Mapping[str, Entity]
    ) -> FeatureView:
        lifetime = d["kind"] == "lifetime"
        return cls(
            name=d["name"],
            source=sources[d["source"]],
            entity=entities[d["entity"]],
            features=[Aggregation.from_dict(a) for a in d["features"]],
            kind=d["kind"],
            window=None if lifetime else d["window_ms"],
            tile=None if lifetime else d["tile_ms"],
            allowed_lateness=d["allowed_lateness_ms"],
            ttl=d["ttl_ms"],
            version=d.get("version", 1),
            backfill_start=d.get("backfill_start_ms"),
            **_meta_args(d),
        )


@dataclass(frozen=True)
class Labels:
    """Ground truth arriving on ``source``: ``key`` joins a label to the scored event (a field both
    carry), ``target`` is the field learnt, ``task`` how, ``max_delay`` how late labels may come."""

    name: str
    source: Source
    key: str
    target: str
    task: Task
    max_delay: str | int = "1d"
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"labels {self.name!r}"
        _name(self.name, where)
        _check_meta(self, where)
        if not isinstance(self.source, Source):
            raise DefinitionError(f"{where}, field 'source': must be a Source, got {self.source!r}")
        if self.task not in TASKS:
            raise DefinitionError(f"{where}, field 'task': {self.task!r} is not one of {sorted(TASKS)}")
        duration_ms(self.max_delay, f"{where}, field 'max_delay'")
        if isinstance(self.source.schema, Mapping):
            self.check_fields()

    def __hash__(self) -> int:
        return hash(("labels", self.name))

    @property
    def max_delay_ms(self) -> int:
        return duration_ms(self.max_delay, f"labels {self.name!r}")

    def check_fields(self) -> None:
        fields = self.source.fields
        for attr in ("key", "target"):
            value = getattr(self, attr)
            if value not in fields:
                raise DefinitionError(
                    f"labels {self.name!r}, field {attr!r}: {value!r} is not a field of source "
                    f"{self.source.name!r}"
                )
        kind = fields[self.target]
        wanted = {
            "binary": {"boolean", "int", "long"},
            "regression": {"int", "long", "float", "double"},
            "multiclass": PRIMITIVE_AVRO,
        }
        if kind not in wanted[self.task]:
            raise DefinitionError(
                f"labels {self.name!r}, field 'target': a {self.task} target cannot be {kind} "
                f"({self.target!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source.name,
            "key": self.key,
            "target": self.target,
            "task": self.task,
            "max_delay_ms": self.max_delay_ms,
            **_meta(self),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], sources: Mapping[str, Source]) -> Labels:
        return cls(
            d["name"],
            sources[d["source"]],
            d["key"],
            d["target"],
            d["task"],
            d["max_delay_ms"],
            **_meta_args(d),
        )


def split_ref(ref: str, where: str) -> tuple[str, str]:
    """``"view.feature"`` -> (view, feature)."""
    parts = ref.split(".") if isinstance(ref, str) else []
    if len(parts) != 2 or not all(parts):
        raise DefinitionError(f"{where}: {ref!r} is not a 'view.feature' reference")
    return parts[0], parts[1]


@dataclass(frozen=True)
class Model:
    """A model scored on ``request_fields`` of ``request`` records plus online ``features``
    (``"view.feature"`` references, across any views and entities).

    ``learner`` and ``batch_trainer`` are import paths ``"module:factory"``: the learner factory returns
    an object with river's verbs (``learn_one``, ``predict_one`` / ``predict_proba_one``), the batch
    trainer a ``torch.nn.Module`` for the model's numeric inputs (exported to ONNX). ``metric`` is a
    river metric class (``"ROCAUC"`` or ``"module:Class"``); ``monitor`` the inputs watched for drift.
    """

    name: str
    task: Task
    request: Source
    request_fields: Sequence[str]
    features: Sequence[str] = ()
    labels: Labels | None = None
    learner: str | None = None
    batch_trainer: str | None = None
    metric: str | None = None
    publish_every: int = 500
    monitor: Sequence[str] = ()
    policy: Policy = field(default_factory=Policy)
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if not isinstance(self.policy, Policy):
            raise DefinitionError(f"{where}, field 'policy': must be a Policy, got {self.policy!r}")
        self.policy.check(where)
        _name(self.name, where)
        _check_meta(self, where)
        if self.task not in TASKS:
            raise DefinitionError(f"{where}, field 'task': {self.task!r} is not one of {sorted(TASKS)}")
        if not isinstance(self.request, Source):
            raise DefinitionError(f"{where}, field 'request': must be a Source, got {self.request!r}")
        if self.labels is not None and not isinstance(self.labels, Labels):
            raise DefinitionError(f"{where}, field 'labels': must be Labels, got {self.labels!r}")
        if self.labels is not None and self.labels.task != self.task:
            raise DefinitionError(
                f"{where}, field 'labels': labels {self.labels.name!r} are for a {self.labels.task} task, "
                f"the model is {self.task}"
            )
        for attr in ("learner", "batch_trainer"):
            value = getattr(self, attr)
            if value is not None and not (isinstance(value, str) and _IMPORT_PATH.match(value)):
                raise DefinitionError(
                    f"{where}, field {attr!r}: {value!r} is not an import path 'module:factory'"
                )
        if self.learner is None and self.batch_trainer is None:
            raise DefinitionError(f"{where}: needs a learner or a batch_trainer (or both)")
        if (self.learner or self.batch_trainer) and self.labels is None:
            raise DefinitionError(f"{where}, field 'labels': a model that learns needs labels")
        if not isinstance(self.publish_every, int) or self.publish_every < 1:
            raise DefinitionError(f"{where}, field 'publish_every': must be a positive integer")
        object.__setattr__(self, "request_fields", tuple(self.request_fields))
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "monitor", tuple(self.monitor))
        refs = [split_ref(r, f"{where}, field 'features[{i}]'") for i, r in enumerate(self.features)]
        names = [*self.request_fields, *(f for _, f in refs)]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise DefinitionError(
                f"{where}: input names must be unique across request fields and features: {dupes}"
            )
        for i, m in enumerate(self.monitor):
            if m not in names:
                raise DefinitionError(f"{where}, field 'monitor[{i}]': {m!r} is not an input of the model")
        if isinstance(self.request.schema, Mapping):
            self.check_fields()

    def __hash__(self) -> int:
        return hash(("model", self.name))

    @property
    def metric_name(self) -> str:
        return self.metric or DEFAULT_METRIC[self.task]

    @property
    def feature_refs(self) -> tuple[tuple[str, str], ...]:
        return tuple(split_ref(r, f"model {self.name!r}") for r in self.features)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Request fields, then features, in the order the model sees them."""
        return (*self.request_fields, *(f for _, f in self.feature_refs))

    def check_fields(self) -> None:
        fields = self.request.fields
        for i, name in enumerate(self.request_fields):
            where = f"model {self.name!r}, field 'request_fields[{i}]'"
            if name not in fields:
                raise DefinitionError(f"{where}: {name!r} is not a field of source {self.request.name!r}")
            if fields[name] not in PRIMITIVE_AVRO:
                raise DefinitionError(
                    f"{where}: {name!r} is {fields[name]}; request fields must be primitives"
                )
        if self.labels is not None and self.labels.key not in fields:
            raise DefinitionError(
                f"model {self.name!r}, field 'labels': key {self.labels.key!r} of labels "
                f"{self.labels.name!r} is not a field of the request source {self.request.name!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "request": self.request.name,
            "request_fields": list(self.request_fields),
            "features": list(self.features),
            "labels": self.labels.name if self.labels else None,
            "learner": self.learner,
            "batch_trainer": self.batch_trainer,
            "metric": self.metric_name,
            "publish_every": self.publish_every,
            "monitor": list(self.monitor),
            # Only when declared, so that digests of projects without one stay what they were.
            **({"policy": self.policy.to_dict()} if self.policy != Policy() else {}),
            **_meta(self),
        }

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], sources: Mapping[str, Source], labels: Mapping[str, Labels]
    ) -> Model:
        return cls(
            name=d["name"],
            task=d["task"],
            request=sources[d["request"]],
            request_fields=d["request_fields"],
            features=d["features"],
            labels=labels[d["labels"]] if d.get("labels") else None,
            learner=d.get("learner"),
            batch_trainer=d.get("batch_trainer"),
            metric=d.get("metric"),
            publish_every=d["publish_every"],
            monitor=d.get("monitor", ()),
            policy=Policy.from_dict(d.get("policy")),
            **_meta_args(d),
        )


Definition = Source | Entity | FeatureView | Labels | Model
KIND_OF: dict[type, str] = {
    Source: "source",
    Entity: "entity",
    FeatureView: "view",
    Labels: "labels",
    Model: "model",
}


@dataclass(frozen=True)
class Project:
    """Every definition of one project, cross-checked: references resolve, fields exist with usable
    types, names are unique per kind. ``origins`` maps ``"kind:name"`` to the file that declared it (for
    error messages; not part of the definitions)."""

    name: str
    sources: Mapping[str, Source] = field(default_factory=dict)
    entities: Mapping[str, Entity] = field(default_factory=dict)
    views: Mapping[str, FeatureView] = field(default_factory=dict)
    labels: Mapping[str, Labels] = field(default_factory=dict)
    models: Mapping[str, Model] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    # Older versions of views still kept (``name@version`` -> view): computed and served to the model
    # versions trained on them until the feature processor retires them. ``views`` holds the newest.
    previous_views: Mapping[str, FeatureView] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _name(self.name, f"project {self.name!r}")

    @classmethod
    def of(
        cls, name: str, definitions: Sequence[Definition], origins: Mapping[int, str] | None = None
    ) -> Project:
        """A project of ``definitions`` (Sources, Entities, FeatureViews, Labels, Models), validated.

        Objects a definition refers to (a view's source and entity, a model's labels) are part of the
        project even when not listed. ``origins`` maps ``id(definition)`` to the file that declared it.
        """
        found: dict[str, dict[str, Any]] = {k: {} for k in KIND_OF.values()}
        where_of: dict[str, str] = {}
        origins = origins or {}

        def add(obj: Any, origin: str | None) -> None:
            kind = KIND_OF.get(type(obj))
            if kind is None:
                raise DefinitionError(f"{origin or 'project'}: {obj!r} is not a definition")
            origin = origins.get(id(obj), origin)
            existing = found[kind].get(obj.name)
            if existing is not None:
                if existing == obj:
                    return
                first = where_of.get(f"{kind}:{obj.name}", "?")
                raise DefinitionError(
                    f"{origin or 'project'}: {kind} {obj.name!r} is declared twice, differently "
                    f"(also in {first})"
                )
            found[kind][obj.name] = obj
            if origin:
                where_of[f"{kind}:{obj.name}"] = origin
            for child in _children(obj):
                add(child, origin)

        for d in definitions:
            add(d, None)
        project = cls(
            name,
            found["source"],
            found["entity"],
            found["view"],
            found["labels"],
            found["model"],
            origins=where_of,
        )
        project.validate()
        return project

    def where(self, kind: str, name: str) -> str:
        origin = self.origins.get(f"{kind}:{name}")
        return f"{origin}: " if origin else ""

    def validate(self) -> None:
        """Cross-checks every definition; raises :class:`DefinitionError` naming file, object and field."""
        topics: dict[str, str] = {}
        for source in self.sources.values():
            with _located(self.where("source", source.name)):
                source.check_schema()
                if source.topic_name in topics:
                    raise DefinitionError(
                        f"source {source.name!r}, field 'topic': {source.topic_name!r} is also the topic of "
                        f"source {topics[source.topic_name]!r}"
                    )
                topics[source.topic_name] = source.name
        for view in self.views.values():
            with _located(self.where("view", view.name)):
                view.check_fields()
        for ref, old in self.previous_views.items():
            newest = self.views.get(old.name)
            if ref != old.ref or (newest is not None and newest.version <= old.version):
                raise DefinitionError(
                    f"view {ref!r}: a previous version must be older than the newest "
                    f"({newest.ref if newest else 'removed'})"
                )
            if self.sources.get(old.source_name) != old.source:
                raise DefinitionError(
                    f"view {ref!r} (kept for the model versions trained on it), field 'source': "
                    f"source {old.source_name!r} is not part of the project; keep it until the version "
                    "is retired"
                )
            try:
                old.check_fields()
            except DefinitionError as exc:
                raise DefinitionError(f"{exc} (in kept version {ref})") from None
        for labels in self.labels.values():
            with _located(self.where("labels", labels.name)):
                labels.check_fields()
        features = {(v.name, f) for v in self.views.values() for f in v.feature_names}
        for model in self.models.values():
            with _located(self.where("model", model.name)):
                model.check_fields()
                for i, (view_name, feat) in enumerate(model.feature_refs):
                    where = f"model {model.name!r}, field 'features[{i}]'"
                    found_view = self.views.get(view_name)
                    if found_view is None:
                        raise DefinitionError(
                            f"{where}: no feature view {view_name!r} (views: {', '.join(self.views)})"
                        )
                    if (view_name, feat) not in features:
                        raise DefinitionError(
                            f"{where}: view {view_name!r} has no feature {feat!r} "
                            f"(features: {', '.join(found_view.feature_names)})"
                        )
                    if found_view.entity_key not in model.request.fields:
                        raise DefinitionError(
                            f"{where}: the request source {model.request.name!r} has no field "
                            f"{found_view.entity_key!r}, the join key of entity "
                            f"{found_view.entity.name!r} that view "
                            f"{view_name!r} is kept per"
                        )

    @property
    def view_versions(self) -> dict[str, FeatureView]:
        """Every kept version of every view, by ``name@version`` (the newest and the previous ones)."""
        return {**self.previous_views, **{v.ref: v for v in self.views.values()}}

    def view_version(self, name: str, version: int) -> FeatureView:
        """Version ``version`` of view ``name``; raises :class:`UnknownViewVersion` if it is not kept."""
        found = self.view_versions.get(f"{name}@{version}")
        if found is None:
            kept = sorted(ref for ref in self.view_versions if ref.partition("@")[0] == name)
            raise UnknownViewVersion(
                f"project {self.name!r} keeps no version {version} of view {name!r} "
                f"(kept: {', '.join(kept) or 'none'})"
            )
        return found

    def model_views(self, model: Model, versions: Mapping[str, int] | None = None) -> list[FeatureView]:
        """The views a model reads, in the order first referenced: the newest versions, or those named
        by ``versions`` (view name -> version, as a model version's lineage records them)."""
        names = dict.fromkeys(v for v, _ in model.feature_refs)
        if not versions:
            return [self.views[v] for v in names]
        return [self.view_version(v, versions[v]) if v in versions else self.views[v] for v in names]

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form the registry keeps."""
        return {
            "project": self.name,
            "sources": [s.to_dict() for s in sorted(self.sources.values(), key=lambda s: s.name)],
            "entities": [e.to_dict() for e in sorted(self.entities.values(), key=lambda e: e.name)],
            "views": [v.to_dict() for v in sorted(self.views.values(), key=lambda v: v.name)],
            "previous_views": [
                v.to_dict() for v in sorted(self.previous_views.values(), key=lambda v: (v.name, v.version))
            ],
            "labels": [lab.to_dict() for lab in sorted(self.labels.values(), key=lambda lab: lab.name)],
            "models": [m.to_dict() for m in sorted(self.models.values(), key=lambda m: m.name)],
        }

    def canonical_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """SHA-256 of the canonical JSON: the content hash every service runs."""
        return hashlib.sha256(self.canonical_json()).hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Project:
        sources = {s["name"]: Source.from_dict(s) for s in d["sources"]}
        entities = {e["name"]: Entity.from_dict(e) for e in d["entities"]}
        views = {v["name"]: FeatureView.from_dict(v, sources, entities) for v in d["views"]}
        labels = {lab["name"]: Labels.from_dict(lab, sources) for lab in d["labels"]}
        models = {m["name"]: Model.from_dict(m, sources, labels) for m in d["models"]}
        previous = [FeatureView.from_dict(v, sources, entities) for v in d.get("previous_views", ())]
        project = cls(
            d["project"],
            sources,
            entities,
            views,
            labels,
            models,
            previous_views={v.ref: v for v in previous},
        )
        project.validate()
        return project


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, FeatureView):
        return [obj.source, obj.entity]
    if isinstance(obj, Labels):
        return [obj.source]
    if isinstance(obj, Model):
        return [obj.request, *([obj.labels] if obj.labels else [])]
    return []


class _located:
    """Prefix a DefinitionError raised inside with the declaring file."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, DefinitionError) and self.prefix and not str(exc).startswith(self.prefix):
            raise DefinitionError(self.prefix + str(exc)) from None
