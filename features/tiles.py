"""Window math on time tiles: partial aggregates per tile, merged at read time; event-time lateness.

A sliding window of W ms at tile granularity T is the set of tiles whose start lies in
``(now - W, now]`` rounded down to T; a tumbling window is the one tile holding ``now``; a lifetime
window is one tile for all time. Partials merge associatively and commutatively
(:mod:`features.aggregations`), so tiles can be written in any order and merged in any grouping.

Lateness is decided per source partition against a watermark: the newest event time seen so far in that
partition. An event older than ``watermark - allowed_lateness`` is late: it is not folded in and goes to
the dead-letter topic with the reason, counted. The rule depends only on the partition's order, so a
replay decides exactly as the first pass did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from features import aggregations
from schemas.definitions import LIFETIME_TILE, FeatureView

NO_WATERMARK = -1


def tile_of(view: FeatureView, ts_ms: int) -> int:
    if view.kind == "lifetime":
        return LIFETIME_TILE
    return ts_ms - ts_ms % view.tile_ms


def first_tile(view: FeatureView, now_ms: int) -> int:
    """The oldest tile inside the window ending at ``now_ms``."""
    if view.kind == "lifetime":
        return LIFETIME_TILE
    if view.kind == "tumbling":
        return tile_of(view, now_ms)
    return tile_of(view, now_ms) - view.window_ms + view.tile_ms


def window_tiles(view: FeatureView, now_ms: int) -> list[int]:
    if view.kind == "lifetime":
        return [LIFETIME_TILE]
    return list(range(first_tile(view, now_ms), tile_of(view, now_ms) + 1, view.tile_ms))


def retention_ms(view: FeatureView) -> int | None:
    """How long an idle entity's tiles are kept: its TTL, else as long as any tile can be read."""
    if view.ttl_ms is not None:
        return view.ttl_ms
    return None if view.kind == "lifetime" else view.window_ms + 2 * view.tile_ms


def tile_retention_ms(view: FeatureView) -> int | None:
    """How long one tile can still be read (per-tile structures expire after it)."""
    return retention_ms(view) if view.kind == "lifetime" else view.window_ms + 2 * view.tile_ms


def split_late(
    view: FeatureView, records: Sequence[tuple[int, Mapping[str, Any]]], watermark: int
) -> tuple[list[tuple[int, Mapping[str, Any]]], list[tuple[int, Mapping[str, Any], int]], int]:
    """Split one partition's ``(position, event)`` records, in order, into on-time and late ones.

    Returns the on-time records, the late ones with how late they were (ms), and the new watermark.
    """
    on_time: list[tuple[int, Mapping[str, Any]]] = []
    late: list[tuple[int, Mapping[str, Any], int]] = []
    for position, event in records:
        ts = int(event[view.event_time])
        limit = watermark - view.allowed_lateness_ms
        if watermark != NO_WATERMARK and ts < limit:
            late.append((position, event, limit - ts))
            continue
        on_time.append((position, event))
        watermark = max(watermark, ts)
    return on_time, late, watermark


@dataclass(slots=True)
class EntityDelta:
    """What one batch adds to one entity: partials per tile, the newest event time and the positions of
    the first and last record folded in (the store's per-key exactly-once check compares them with the
    key's stored position; -1 when the events came without positions)."""

    tiles: dict[int, aggregations.Partial]
    newest_ms: int
    first: int = -1
    last: int = -1


def batch_deltas(view: FeatureView, events: Iterable[Mapping[str, Any]]) -> dict[str, EntityDelta]:
    """Group a batch of events into per-entity, per-tile partials."""
    return record_deltas(view, ((-1, event) for event in events))


def record_deltas(
    view: FeatureView, records: Iterable[tuple[int, Mapping[str, Any]]]
) -> dict[str, EntityDelta]:
    """Group ``(position, event)`` records, in order, into per-entity, per-tile partials (no lateness
    check: every record is folded)."""
    out: dict[str, EntityDelta] = {}
    folder = aggregations.Folder(view)
    for position, event in records:
        entity = str(event[view.entity_key])
        ts = int(event[view.event_time])
        delta = out.get(entity)
        if delta is None:
            delta = out[entity] = EntityDelta({}, ts, position)
        delta.last = position
        tile = tile_of(view, ts)
        partial = delta.tiles.get(tile)
        if partial is None:
            partial = delta.tiles[tile] = {}
        folder.fold(partial, event, ts)
        if ts > delta.newest_ms:
            delta.newest_ms = ts
    return out


@dataclass
class PartitionFold:
    """One source partition's batch folded into every view of the source: what :func:`fold_partition`
    returns, keyed by view version (:attr:`FeatureView.ref`, ``name@version``). ``late`` holds, per
    view version, ``(position, event, ms beyond the allowed lateness)``."""

    deltas: dict[str, dict[str, EntityDelta]]  # view ref -> entity -> delta
    late: dict[str, list[tuple[int, Mapping[str, Any], int]]]  # view ref -> late records
    on_time: dict[str, int]  # view ref -> events folded
    watermark: int
    newest_ms: dict[str, int]  # view ref -> newest on-time event time of the batch (freshness samples)


def fold_partition(
    views: Sequence[FeatureView], records: Iterable[tuple[int, Mapping[str, Any]]], watermark: int
) -> PartitionFold:
    """Split one partition's ``(position, event)`` records, in order, into on-time and late ones per view
    (the rule of :func:`split_late`) and fold the on-time ones into per-entity tile partials, in one pass.

    The views must share one event-time field: the watermark, the newest event time seen in the
    partition, is then the same for all of them (a late event is older than it, so it never moves it).
    """
    event_time = views[0].event_time
    if any(v.event_time != event_time for v in views):
        raise ValueError(f"views {[v.name for v in views]} do not share one event-time field")
    deltas: dict[str, dict[str, EntityDelta]] = {v.ref: {} for v in views}
    late: dict[str, list[tuple[int, Mapping[str, Any], int]]] = {v.ref: [] for v in views}
    plan = [
        (
            deltas[v.ref],
            late[v.ref],
            v.entity_key,
            v.allowed_lateness_ms,
            v.kind == "lifetime",
            v.tile_ms,
            aggregations.Folder(v).fold,
        )
        for v in views
    ]
    shared = len({v.entity_key for v in views}) == 1  # one entity per event: read it once
    folded = 0
    for position, event in records:
        folded += 1
        ts = int(event[event_time])
        entity = None
        for by_entity, late_ones, entity_field, lateness, lifetime, tile_ms, fold in plan:
            if watermark != NO_WATERMARK and ts < watermark - lateness:
                late_ones.append((position, event, watermark - lateness - ts))
                continue
            if entity is None or not shared:
                entity = str(event[entity_field])
            tile = LIFETIME_TILE if lifetime else ts - ts % tile_ms
            delta = by_entity.get(entity)
            if delta is None:
                partial: aggregations.Partial = {}
                fold(partial, event, ts)
                by_entity[entity] = EntityDelta({tile: partial}, ts, position, position)
                continue
            if ts > delta.newest_ms:
                delta.newest_ms = ts
            delta.last = position
            partial = delta.tiles.get(tile)  # type: ignore[assignment]
            if partial is None:
                partial = delta.tiles[tile] = {}
            fold(partial, event, ts)
        if ts > watermark:
            watermark = ts
    on_time = {ref: folded - len(late[ref]) for ref in deltas}
    newest = {
        ref: max((d.newest_ms for d in by_entity.values()), default=NO_WATERMARK)
        for ref, by_entity in deltas.items()
    }
    return PartitionFold(deltas, late, on_time, watermark, newest)


def refold_key(
    view: FeatureView,
    records: Sequence[tuple[int, Mapping[str, Any]]],
    watermark: int,
    entity: str,
    after: int,
) -> EntityDelta | None:
    """One key's delta again, from only its records after position ``after``: what a conflict in the
    store (another writer applied part of the batch to this key) is redone with.

    ``records`` and ``watermark`` are those the batch was folded from (:func:`fold_partition`): the
    lateness decisions depend only on the partition's prefix, so they are the same as the first time.
    """
    on_time, _, _ = split_late(view, records, watermark)
    key = view.entity_key
    todo = [(p, e) for p, e in on_time if p > after and str(e[key]) == entity]
    return record_deltas(view, todo).get(entity) if todo else None


def window_values(
    view: FeatureView,
    tiles: Mapping[int, Mapping[str, Any]],
    now_ms: int,
    distinct: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Feature values over the window ending at ``now_ms`` from stored tiles."""
    lo, hi = first_tile(view, now_ms), tile_of(view, now_ms)
    merged = aggregations.merge(p for t, p in tiles.items() if lo <= t <= hi)
    return aggregations.values(view, merged, distinct)
