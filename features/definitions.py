"""Feature definitions: what is aggregated, per which entity, over which window.

A view is computed online by the stream processor and read by serving with the same window math
(:mod:`features.tiles`), so there is one definition and no second copy of it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from infra.errors import FeatureError

AggKind = Literal["count", "sum", "mean"]
_NEEDS_FIELD = {"sum", "mean"}


@dataclass(frozen=True)
class Aggregation:
    name: str
    kind: AggKind
    field: str | None = None
    default: float = 0.0  # the value served when the window holds no event


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

    def __post_init__(self) -> None:
        where = f"feature view {self.name!r}"
        if self.tile_ms <= 0 or self.window_ms % self.tile_ms:
            raise FeatureError(f"{where}: window_ms must be a positive multiple of tile_ms")
        names = [a.name for a in self.aggregations]
        if len(set(names)) != len(names):
            raise FeatureError(f"{where}: aggregation names must be unique, got {names}")
        for agg in self.aggregations:
            if agg.kind not in ("count", "sum", "mean"):
                raise FeatureError(f"{where}: aggregation {agg.name!r} has unknown kind {agg.kind!r}")
            if (agg.kind in _NEEDS_FIELD) != (agg.field is not None):
                raise FeatureError(f"{where}: aggregation {agg.name!r} ({agg.kind}) field is misdeclared")

    @property
    def summed_fields(self) -> tuple[str, ...]:
        """Source fields whose sums the tiles keep."""
        return tuple(sorted({a.field for a in self.aggregations if a.field is not None}))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.aggregations)


CARD_ACTIVITY = FeatureView(
    name="card_activity",
    entity="card_id",
    source="events",
    event_time="ts",
    window_ms=3_600_000,
    tile_ms=60_000,
    aggregations=(
        Aggregation("txn_count_1h", "count"),
        Aggregation("amount_sum_1h", "sum", "amount"),
        Aggregation("amount_mean_1h", "mean", "amount"),
    ),
)

VIEWS: dict[str, FeatureView] = {CARD_ACTIVITY.name: CARD_ACTIVITY}
