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
from features.definitions import LIFETIME_TILE, FeatureView

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


@dataclass
class EntityDelta:
    """What one batch adds to one entity: partials per tile and the newest event time."""

    tiles: dict[int, aggregations.Partial]
    newest_ms: int


def batch_deltas(view: FeatureView, events: Iterable[Mapping[str, Any]]) -> dict[str, EntityDelta]:
    """Group a batch of events into per-entity, per-tile partials."""
    out: dict[str, EntityDelta] = {}
    for event in events:
        entity = str(event[view.entity])
        ts = int(event[view.event_time])
        delta = out.get(entity)
        if delta is None:
            delta = out[entity] = EntityDelta({}, ts)
        tile = tile_of(view, ts)
        partial = aggregations.partial_of(view, event)
        delta.tiles[tile] = (
            aggregations.merge((delta.tiles[tile], partial)) if tile in delta.tiles else partial
        )
        delta.newest_ms = max(delta.newest_ms, ts)
    return out


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
