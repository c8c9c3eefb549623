"""Point-in-time training sets: each label joined with the feature values as of its event's time.

The events are replayed through the same code the online processor runs: per source partition, in
order, the same lateness rule (:func:`features.tiles.split_late`) drops what the processor would have
dropped; then, in event-time order, each label's row is the value of every view's window ending just
before the labelled event — only events strictly earlier than it count, so nothing from its future (or
the event itself, which serving had not seen when it scored) leaks into a training row.

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

from features import aggregations, tiles
from schemas.definitions import FeatureView

log = logging.getLogger(__name__)


@dataclass
class _EntityTiles:
    tiles: dict[int, aggregations.Partial] = field(default_factory=dict)


def on_time_events(
    views: Sequence[FeatureView], partitions: Mapping[int, Sequence[Mapping[str, Any]]]
) -> dict[str, list[Mapping[str, Any]]]:
    """Per view, the events the online processor would fold in (partitions in their log order)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for view in views:
        kept: list[Mapping[str, Any]] = []
        for records in partitions.values():
            on_time, late, _ = tiles.split_late(view, list(enumerate(records)), tiles.NO_WATERMARK)
            kept += [e for _, e in on_time]
            if late:
                log.info("view %s: %d late events left out, as online", view.name, len(late))
        out[view.name] = sorted(kept, key=lambda e: int(e[view.event_time]))
    return out


def point_in_time(
    views: Sequence[FeatureView],
    partitions: Mapping[int, Sequence[Mapping[str, Any]]],
    labels: Iterable[Mapping[str, Any]],
    *,
    entity_of_label: str = "card_id",
    time_of_label: str = "event_ts",
) -> list[dict[str, Any]]:
    """One row per label: the label's fields plus every view's features as of the label's time."""
    ordered_labels = sorted(labels, key=lambda lab: int(lab[time_of_label]))
    events = on_time_events(views, partitions)
    rows: list[dict[str, Any]] = [dict(lab) for lab in ordered_labels]
    for view in views:
        stream = events[view.name]
        times = [int(e[view.event_time]) for e in stream]
        state: dict[str, _EntityTiles] = {}
        folded = 0
        for row, label in zip(rows, ordered_labels, strict=True):
            as_of = int(label[time_of_label])
            upto = bisect.bisect_left(times, as_of)  # events strictly before the labelled event
            for event in stream[folded:upto]:
                entity = state.setdefault(str(event[view.entity]), _EntityTiles())
                tile = tiles.tile_of(view, int(event[view.event_time]))
                partial = aggregations.partial_of(view, event)
                entity.tiles[tile] = (
                    aggregations.merge((entity.tiles[tile], partial)) if tile in entity.tiles else partial
                )
            folded = max(folded, upto)
            entity_state = state.get(str(label[entity_of_label]))
            row.update(tiles.window_values(view, entity_state.tiles if entity_state else {}, as_of - 1))
    return rows


def _avro_type(values: Iterable[Any]) -> list[str]:
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {float, int}:
        return ["null", "double"]
    if kinds <= {bool}:
        return ["null", "boolean"]
    return ["null", "string"]


def write_avro(rows: Sequence[Mapping[str, Any]], path: Path, name: str = "TrainingRow") -> Path:
    """Write rows as an Avro container file (schema inferred from the values, every field nullable)."""
    kinds = {c: _avro_type(r.get(c) for r in rows)[1] for c in (list(rows[0]) if rows else [])}
    schema = {
        "type": "record",
        "name": name,
        "namespace": "tide.training",
        "fields": [{"name": c, "type": ["null", kind], "default": None} for c, kind in kinds.items()],
    }
    converted = []
    for row in rows:
        out: dict[str, Any] = {}
        for c, kind in kinds.items():
            v = row.get(c)
            out[c] = (
                None if v is None else float(v) if kind == "double" else v if kind == "boolean" else str(v)
            )
        converted.append(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), converted)
    return path


def from_topics(settings: Any, views: Sequence[FeatureView], out: Path) -> dict[str, Any]:
    """Replay the events and labels topics (from the beginning to their current end) into ``out``."""
    from schemas import codec
    from infra.kafka import read_to_end
    from infra.topics import TOPICS, topic

    sources = {v.source for v in views}
    if len(sources) != 1:
        raise ValueError(
            f"views read from several sources {sorted(sources)}; build one training set per source"
        )
    (source,) = sources
    partitions: dict[int, list[Mapping[str, Any]]] = {}
    for msg in read_to_end(settings, topic(settings, source), TOPICS[source].partitions):
        try:
            partitions.setdefault(msg.partition() or 0, []).append(
                codec.decode(msg.value() or b"", TOPICS[source].record)
            )
        except Exception as exc:  # the online processor dead-letters these too
            log.warning("skipping undecodable %s record at offset %s: %s", source, msg.offset(), exc)
    labels = []
    for msg in read_to_end(settings, topic(settings, "labels"), TOPICS["labels"].partitions):
        try:
            labels.append(codec.decode(msg.value() or b"", "label"))
        except Exception as exc:
            log.warning("skipping undecodable label at offset %s: %s", msg.offset(), exc)
    rows = point_in_time(views, partitions, labels)
    write_avro(rows, out)
    return {"rows": len(rows), "events": sum(len(p) for p in partitions.values()), "path": str(out)}
