"""Window math on time tiles: partial aggregates per tile, merged at read time.

A sliding window of W ms at tile granularity T is the set of tiles whose start lies in
``(now - W, now]`` rounded down to T. Partials are counts and sums, which merge by addition
(associative and commutative), so tiles can be written in any order and merged in any grouping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from features.definitions import FeatureView

COUNT = "n"


def tile_of(ts_ms: int, tile_ms: int) -> int:
    return ts_ms - ts_ms % tile_ms


def first_tile(view: FeatureView, now_ms: int) -> int:
    """The oldest tile still inside the window ending at ``now_ms``."""
    return tile_of(now_ms, view.tile_ms) - view.window_ms + view.tile_ms


def partial_of(view: FeatureView, event: Mapping[str, Any]) -> dict[str, float]:
    """The partial aggregate one event contributes to its tile."""
    partial = {COUNT: 1.0}
    for field in view.summed_fields:
        partial["s:" + field] = float(event[field])
    return partial


def merge(partials: Iterable[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in partials:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


def values(view: FeatureView, merged: Mapping[str, float]) -> dict[str, float]:
    """Feature values from a merged partial (defaults where the window holds no event)."""
    n = merged.get(COUNT, 0.0)
    out: dict[str, float] = {}
    for agg in view.aggregations:
        if agg.kind == "count":
            out[agg.name] = n
        elif n == 0:
            out[agg.name] = agg.default
        elif agg.kind == "sum":
            out[agg.name] = merged.get("s:" + str(agg.field), 0.0)
        else:
            out[agg.name] = merged.get("s:" + str(agg.field), 0.0) / n
    return out


@dataclass
class EntityDelta:
    """What one batch adds to one entity: partials per tile and the newest event time."""

    tiles: dict[int, dict[str, float]]
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
        tile = tile_of(ts, view.tile_ms)
        delta.tiles[tile] = merge((delta.tiles.get(tile, {}), partial_of(view, event)))
        delta.newest_ms = max(delta.newest_ms, ts)
    return out


def window_values(
    view: FeatureView, tiles: Mapping[int, Mapping[str, float]], now_ms: int
) -> dict[str, float]:
    """Feature values over the window ending at ``now_ms`` from stored tiles."""
    lo, hi = first_tile(view, now_ms), tile_of(now_ms, view.tile_ms)
    return values(view, merge(p for t, p in tiles.items() if lo <= t <= hi))
