"""Point-in-time training sets: each label joined with its event and the features as of just before it.

For a :class:`~schemas.definitions.Model` of a project, a label (a record of ``model.labels.source``) is
joined by ``labels.key`` with the request source's event that carries the same value in that field.
Each example is the model's input as serving saw it when it scored that event: the request fields of
the event, then every referenced feature (by its bare name) as of just before the event's time, and the
label's target.

Features are replayed through the code the online processor runs, each view over its own source (a
view may read any source, the labels source included): per source partition, in order, the same
admission check (:mod:`features.admission`) and lateness rule (:func:`features.tiles.split_late`) drop
what the processor would have dropped; then each example gets the value of every view's window ending
at ``event time - 1`` with only events strictly earlier than its event folded in, so nothing from its
future (nor the event itself, which serving had not seen when it scored) leaks into a training row. An
entity whose newest event is older than the view's TTL gets the declared defaults, as serving does.
Distinct counts use the same KMV sketch as the online store (features.aggregations), so they agree.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

from features import aggregations, tiles
from features.admission import Admission
from infra.errors import FeatureError
from infra.kafka import read_to_end
from infra.settings import CommonSettings
from infra.topics import prefixed
from schemas import codec
from schemas.definitions import FeatureView, Model, Project, Source

log = logging.getLogger(__name__)

Record = Mapping[str, Any]
Partitions = Mapping[int, Sequence[Record]]


@dataclass(frozen=True)
class Example:
    """One training example: ``key`` the labels key value, ``x`` the model's inputs (in
    ``model.input_names`` order), ``y`` the target (binary: bool, regression: float, multiclass: str)
    and ``ts`` the event time of the labelled event."""

    key: Any
    x: dict[str, Any]
    y: bool | float | str
    ts: int


def target_of(task: str, value: Any) -> bool | float | str:
    """A label's target as the model's task learns it."""
    if task == "binary":
        return bool(value)
    if task == "regression":
        return float(value)
    return str(value)


# --- replaying views --------------------------------------------------------------------------------------


def admitted_events(
    views: Sequence[FeatureView], partitions: Partitions, source_views: Sequence[FeatureView] | None = None
) -> dict[str, list[Record]]:
    """Per view (all of one source), the events the online processor folds in, in event-time order.

    ``source_views``: every view the project declares on the source (default ``views``): the admission
    check of a source is over all its views, as online. Partitions are in their log order.
    """
    if not views:
        return {}
    admission = Admission(list(source_views or views), None)
    out: dict[str, list[Record]] = {v.name: [] for v in views}
    rejected = 0
    for records in partitions.values():
        admitted = []
        for position, record in enumerate(records):
            if admission.check(record) is None:
                admitted.append((position, record))
            else:
                rejected += 1
        for view in views:
            on_time, late, _ = tiles.split_late(view, admitted, tiles.NO_WATERMARK)
            out[view.name] += [e for _, e in on_time]
            if late:
                log.info("view %s: %d late events left out, as online", view.name, len(late))
    if rejected:
        log.info("source %s: %d poison records left out, as online", views[0].source_name, rejected)
    for view in views:
        out[view.name].sort(key=lambda e, f=view.event_time: int(e[f]))  # type: ignore[misc]
    return out


@dataclass
class _Entity:
    partials: dict[int, aggregations.Partial] = field(default_factory=dict)  # by tile
    newest_ms: int = tiles.NO_WATERMARK


class ViewReplay:
    """One view's state replayed forward in time: :meth:`values` as of increasing times."""

    def __init__(self, view: FeatureView, events: Sequence[Record]) -> None:
        self.view = view
        self.events = events  # in event-time order
        self.times = [int(e[view.event_time]) for e in events]
        self.folded = 0
        self.state: dict[str, _Entity] = {}
        self.folder = aggregations.Folder(view)

    def values(self, entity: str, before_ms: int) -> dict[str, Any]:
        """The view's values for ``entity`` from events strictly before ``before_ms``, read at
        ``before_ms - 1`` (calls must come in non-decreasing ``before_ms``)."""
        view = self.view
        upto = bisect.bisect_left(self.times, before_ms)
        for i in range(self.folded, upto):
            event, ts = self.events[i], self.times[i]
            state = self.state.get(str(event[view.entity_key]))
            if state is None:
                state = self.state[str(event[view.entity_key])] = _Entity()
            tile = tiles.tile_of(view, ts)
            partial = state.partials.get(tile)
            if partial is None:
                partial = state.partials[tile] = {}
            self.folder.fold(partial, event, ts)
            state.newest_ms = max(state.newest_ms, ts)
        self.folded = max(self.folded, upto)
        as_of = before_ms - 1
        found = self.state.get(entity)
        if found is None or (view.ttl_ms is not None and as_of - found.newest_ms > view.ttl_ms):
            return tiles.window_values(view, {}, as_of)  # missing or expired: the declared defaults
        lo = tiles.first_tile(view, as_of)
        found.partials = {t: p for t, p in found.partials.items() if t >= lo}  # never read again
        return tiles.window_values(view, found.partials, as_of)


# --- examples ---------------------------------------------------------------------------------------------


def _views_of(project: Project, model: Model, views: Sequence[FeatureView] | None) -> list[FeatureView]:
    """The views ``model`` reads, in the order first referenced: those given (one version per view
    name), else the project's newest; FeatureError when a view the model reads is not among them."""
    if views is None:
        return project.model_views(model)
    given = {v.name: v for v in views}
    out = []
    for name in dict.fromkeys(v for v, _ in model.feature_refs):
        if name not in given:
            raise FeatureError(f"model {model.name!r}: no version of view {name!r} given to replay")
        out.append(given[name])
    return out


def _partitions(records: Iterable[Record] | Partitions) -> Partitions:
    if isinstance(records, Mapping):
        return records
    return {0: list(records)}


def examples_for(
    project: Project,
    model: Model,
    events_by_partition: Partitions,
    labels: Iterable[Record] | Partitions,
    *,
    sources: Mapping[str, Partitions] | None = None,
    views: Sequence[FeatureView] | None = None,
) -> list[Example]:
    """The model's point-in-time examples, in event-time order (ties by key).

    ``views``: the version of each view the model reads to replay (default: the project's newest,
    ``project.model_views(model)``); the values are those that view version computes.

    ``events_by_partition``: the request source's records per partition, in log order; ``labels``: the
    labels source's records (per partition, or in one sequence). A view over another source reads its
    records from ``sources`` (source name -> records per partition); views over the request or labels
    source read those. A label whose key matches no event is left out; of several labels for one key,
    the newest (by the labels source's event time) counts.
    """
    spec = model.labels
    if spec is None:
        raise FeatureError(f"model {model.name!r} declares no labels: it has no training set")
    request = model.request
    label_parts = _partitions(labels)
    views = _views_of(project, model, views)
    replays: dict[str, ViewReplay] = {}
    for source_name in dict.fromkeys(v.source_name for v in views):
        if sources is not None and source_name in sources:
            records = sources[source_name]
        elif source_name == request.name:
            records = events_by_partition
        elif source_name == spec.source.name:
            records = label_parts
        else:
            raise FeatureError(
                f"model {model.name!r}: a view reads source {source_name!r}; pass its records in sources="
            )
        of_source = [v for v in views if v.source_name == source_name]
        everything = [v for v in project.views.values() if v.source_name == source_name]
        everything += [v for v in of_source if v not in everything]  # an older version, still read
        by_name = {v.name: v for v in of_source}
        for name, admitted in admitted_events(of_source, records, everything).items():
            replays[name] = ViewReplay(by_name[name], admitted)

    newest: dict[Any, tuple[int, Record]] = {}
    for part in label_parts.values():
        for label in part:
            key, target = label.get(spec.key), label.get(spec.target)
            if key is None or target is None:
                continue
            at = label.get(spec.source.event_time)
            at = at if isinstance(at, int) else 0
            if key not in newest or at >= newest[key][0]:
                newest[key] = (at, label)
    events: dict[Any, Record] = {}
    for partition in sorted(events_by_partition):
        for event in events_by_partition[partition]:
            key = event.get(spec.key)
            if key in newest and key not in events and isinstance(event.get(request.event_time), int):
                events[key] = event
    if len(events) < len(newest):
        log.info(
            "%d of %d labels match no event of source %s; left out",
            len(newest) - len(events),
            len(newest),
            request.name,
        )

    joined = sorted(events.items(), key=lambda kv: (int(kv[1][request.event_time]), str(kv[0])))
    refs = model.feature_refs
    out = []
    for key, event in joined:
        ts = int(event[request.event_time])
        values = {view.name: replays[view.name].values(str(event.get(view.entity_key)), ts) for view in views}
        x = {f: event.get(f) for f in model.request_fields}
        x.update({feature: values[view][feature] for view, feature in refs})
        out.append(Example(key, x, target_of(model.task, newest[key][1][spec.target]), ts))
    return out


# --- reading topics ---------------------------------------------------------------------------------------


def read_source(settings: CommonSettings, source: Source) -> dict[int, list[dict[str, Any]]]:
    """A source topic replayed from the beginning to its current end: the decoded records per partition,
    in log order. Records the online processor dead-letters before any view sees them are left out:
    undecodable ones, and events stamped further ahead of their record's timestamp (when the broker
    took it) than the source's ``max_future_skew``."""
    name = prefixed(settings, source.topic_name)
    out: dict[int, list[dict[str, Any]]] = {}
    skipped = 0
    for msg in read_to_end(settings, name, source.partitions):
        try:
            record = codec.decode(msg.value() or b"", source.name)
        except Exception as exc:  # the online processor dead-letters these too
            log.warning("skipping undecodable %s record at offset %s: %s", name, msg.offset(), exc)
            continue
        kind, stamped = msg.timestamp()
        ts = record.get(source.event_time)
        if kind != TIMESTAMP_NOT_AVAILABLE and isinstance(ts, int) and ts > stamped + source.future_skew_ms:
            skipped += 1
            continue
        out.setdefault(msg.partition() or 0, []).append(record)
    if skipped:
        log.info("%s: %d events from the future left out, as online", name, skipped)
    return out


def _model(project: Project, name: str) -> Model:
    model = project.models.get(name)
    if model is None:
        raise FeatureError(f"no model {name!r} (models: {', '.join(project.models) or 'none'})")
    return model


def replay(
    settings: CommonSettings,
    project: Project,
    model: Model | str,
    views: Sequence[FeatureView] | None = None,
) -> list[Example]:
    """The model's examples replayed from the topics (the request source, the labels source and every
    source a view of the model reads), in event-time order: the history a trainer starts a model from,
    each input as serving would have seen it. ``views``: the view versions to replay (as
    :func:`examples_for`)."""
    model = _model(project, model) if isinstance(model, str) else model
    if model.labels is None:
        raise FeatureError(f"model {model.name!r} declares no labels: it has no training set")
    views = _views_of(project, model, views)
    needed = {model.request.name: model.request, model.labels.source.name: model.labels.source}
    needed.update({v.source_name: v.source for v in views})
    records = {name: read_source(settings, source) for name, source in needed.items()}
    return examples_for(
        project,
        model,
        records[model.request.name],
        records[model.labels.source.name],
        sources=records,
        views=views,
    )


# --- writing ----------------------------------------------------------------------------------------------


def _column_types(
    project: Project, model: Model, views: Sequence[FeatureView] | None = None
) -> dict[str, str]:
    """Column -> Avro primitive: the key, the event time, every input, the target."""
    spec = model.labels
    assert spec is not None
    request = model.request.fields
    columns = {spec.key: spec.source.fields.get(spec.key, "string"), model.request.event_time: "long"}
    columns.update({f: request[f] for f in model.request_fields})
    by_name = {v.name: v for v in _views_of(project, model, views)}
    for view_name, feature in model.feature_refs:
        view = by_name[view_name]
        agg = next(a for a in view.aggregations if a.name == feature)
        columns[feature] = view.source.fields[agg.field] if agg.kind == "last" and agg.field else "double"
    if spec.target in columns:
        raise FeatureError(f"model {model.name!r}: the target {spec.target!r} is also a column of its inputs")
    columns[spec.target] = {"binary": "boolean", "regression": "double"}.get(model.task, "string")
    return columns


def _coerce(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind in ("double", "float"):
        return float(value)
    if kind in ("long", "int"):
        return int(value)
    if kind == "boolean":
        return bool(value)
    return str(value)


def write_avro(
    project: Project,
    model: Model,
    examples: Sequence[Example],
    path: Path,
    views: Sequence[FeatureView] | None = None,
) -> Path:
    """Write ``examples`` as an Avro container file: one record per example with the labels key, the
    event time, every input and the target (every column nullable, typed from the definitions; from
    ``views``, the view versions replayed, when given)."""
    spec = model.labels
    assert spec is not None
    columns = _column_types(project, model, views)
    schema = {
        "type": "record",
        "name": "TrainingExample",
        "namespace": f"tide.training.{model.name}",
        "doc": f"Point-in-time training examples of model {model.name!r} of project {project.name!r}",
        "fields": [{"name": c, "type": ["null", kind], "default": None} for c, kind in columns.items()],
    }
    rows = []
    for example in examples:
        row = {
            spec.key: example.key,
            model.request.event_time: example.ts,
            **example.x,
            spec.target: example.y,
        }
        rows.append({c: _coerce(kind, row.get(c)) for c, kind in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), rows)
    return path


def from_topics(settings: CommonSettings, project: Project, model_name: str, out: Path) -> dict[str, Any]:
    """Replay the topics into the point-in-time training set of ``model_name``, written to ``out``."""
    model = _model(project, model_name)
    examples = replay(settings, project, model)
    write_avro(project, model, examples, out)
    columns = list(_column_types(project, model))
    return {"model": model.name, "examples": len(examples), "columns": columns, "path": str(out)}
