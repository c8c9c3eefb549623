"""Feature definitions, mergeable aggregations, window math and lateness (pure code)."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from features import aggregations, tiles
from schemas.definitions import CARD_ACTIVITY, VIEWS, Aggregation, FeatureView, load
from features.store import pack, parse_tiles, row_of, unpack
from infra.errors import FeatureError

HOUR, MIN, DAY = 3_600_000, 60_000, 86_400_000
START = 1_700_000_000_000

ALL_KINDS = FeatureView(
    name="all_kinds",
    entity="card_id",
    source="events",
    event_time="ts",
    window_ms=HOUR,
    tile_ms=MIN,
    aggregations=(
        Aggregation("n", "count"),
        Aggregation("total", "sum", "amount"),
        Aggregation("avg", "mean", "amount"),
        Aggregation("lo", "min", "amount", None),
        Aggregation("hi", "max", "amount", None),
        Aggregation("sd", "stddev", "amount"),
        Aggregation("latest", "last", "category", None),
        Aggregation("merchants", "distinct", "merchant_id"),
        Aggregation("p90", "quantile", "amount", None, 0.9),
        Aggregation("p50", "quantile", "amount", None, 0.5),
    ),
)


def events(n: int, seed: int = 1, span: int = 2 * HOUR, cards: int = 5) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [
        {
            "card_id": f"c{rng.randrange(cards)}",
            "amount": round(rng.lognormvariate(3, 1), 2),
            "merchant_id": f"m{rng.randrange(40)}",
            "category": rng.choice(["grocery", "fuel", "travel"]),
            "ts": START + rng.randrange(span),
        }
        for _ in range(n)
    ]


def brute_force(evs: list[dict[str, object]], q: float) -> dict[str, object]:
    amounts = [float(e["amount"]) for e in evs]  # type: ignore[arg-type]
    rank = max(math.ceil(q * len(amounts)), 1)
    newest = max(evs, key=lambda e: e["ts"])  # type: ignore[arg-type, return-value]
    return {
        "n": len(evs),
        "total": sum(amounts),
        "avg": statistics.fmean(amounts),
        "lo": min(amounts),
        "hi": max(amounts),
        "sd": statistics.pstdev(amounts),
        "latest": newest["category"],
        "merchants": len({e["merchant_id"] for e in evs}),
        "quantile": sorted(amounts)[rank - 1],
    }


@pytest.mark.parametrize(
    ("view", "now", "first", "last"),
    [
        (ALL_KINDS, 10 * HOUR + 30_000, 9 * HOUR + MIN, 10 * HOUR),
        (replace(ALL_KINDS, kind="tumbling", window_ms=DAY, tile_ms=DAY), 3 * DAY + 5, 3 * DAY, 3 * DAY),
        (replace(ALL_KINDS, kind="lifetime", window_ms=0, tile_ms=0), 3 * DAY + 5, 0, 0),
    ],
)
def test_window_tiles_per_kind(view: FeatureView, now: int, first: int, last: int) -> None:
    window = tiles.window_tiles(view, now)
    assert (window[0], window[-1]) == (first, last)
    assert tiles.tile_of(view, now) == last


def test_merge_is_associative_and_commutative_for_every_slot() -> None:
    rng = random.Random(3)
    parts = [aggregations.partial_of(ALL_KINDS, e) for e in events(60, seed=4)]
    left = aggregations.merge([aggregations.merge(parts[:20]), aggregations.merge(parts[20:])])
    right = aggregations.merge([parts[0], aggregations.merge(parts[1:45]), aggregations.merge(parts[45:])])
    shuffled = parts[:]
    rng.shuffle(shuffled)
    for other in (right, aggregations.merge(shuffled)):
        assert other.keys() == left.keys()
        for k, v in left.items():
            if isinstance(v, float):
                assert other[k] == pytest.approx(v, rel=1e-12), k
            else:
                assert other[k] == v, k


def test_every_aggregation_matches_brute_force() -> None:
    evs = events(800)
    now = START + 2 * HOUR
    lo = tiles.first_tile(ALL_KINDS, now)
    for card, delta in tiles.batch_deltas(ALL_KINDS, evs).items():
        got = tiles.window_values(ALL_KINDS, delta.tiles, now)
        inside = [e for e in evs if e["card_id"] == card and lo <= e["ts"] <= now]  # type: ignore[operator]
        want = brute_force(inside, 0.9)
        for name in ("n", "total", "avg", "lo", "hi", "sd"):
            assert got[name] == pytest.approx(want[name], rel=1e-9), name
        assert got["merchants"] == want["merchants"]
        assert got["latest"] == want["latest"]
        # the sketch's quantile lies within ALPHA (relative) of the true one
        assert got["p90"] == pytest.approx(want["quantile"], rel=aggregations.ALPHA * 1.01)
        assert got["p50"] == pytest.approx(
            brute_force(inside, 0.5)["quantile"], rel=aggregations.ALPHA * 1.01
        )


def test_empty_window_serves_declared_defaults() -> None:
    values = tiles.window_values(ALL_KINDS, {}, START)
    assert values["n"] == 0 and values["total"] == 0.0 and values["merchants"] == 0.0
    assert values["lo"] is None and values["latest"] is None and values["p90"] is None


def test_lateness_is_decided_in_partition_order() -> None:
    view = replace(ALL_KINDS, allowed_lateness_ms=10_000)
    records = [
        (0, {"ts": 100_000}),
        (1, {"ts": 95_000}),
        (2, {"ts": 80_000}),
        (3, {"ts": 130_000}),
        (4, {"ts": 119_999}),
        (5, {"ts": 120_000}),
    ]
    on_time, late, watermark = tiles.split_late(view, records, tiles.NO_WATERMARK)
    assert [p for p, _ in on_time] == [0, 1, 3, 5]
    assert [(p, by) for p, _, by in late] == [(2, 10_000), (4, 1)]
    assert watermark == 130_000
    # the same records split anywhere decide the same
    a_on, a_late, wm = tiles.split_late(view, records[:3], tiles.NO_WATERMARK)
    b_on, b_late, wm = tiles.split_late(view, records[3:], wm)
    assert a_on + b_on == on_time and a_late + b_late == late and wm == watermark


def test_store_rows_missing_expired_present() -> None:
    view = replace(CARD_ACTIVITY, ttl_ms=DAY)
    now = 10 * DAY
    missing = row_of(view, "nobody", None, [], now)
    assert missing.status == "missing" and missing.values["txn_count_1h"] == 0
    stale_tile = tiles.tile_of(view, now - 2 * DAY)
    expired = row_of(view, "old", f"{now - 2 * DAY} {stale_tile}".encode(), [], now)
    assert expired.status == "expired" and expired.values["txn_count_1h"] == 0
    tile = tiles.tile_of(view, now)
    packed = [str(tile).encode(), b'n=2\ns:amount=30.0\nlast:category=7 "fuel"\nd:merchant_id=["m1","m2"]']
    row = row_of(view, "x", f"{now - 5} {tile}".encode(), packed, now)
    assert row.status == "present" and row.age_ms == 5
    assert row.values["amount_mean_1h"] == 15.0 and row.values["merchants_1h"] == 2.0
    assert parse_tiles(packed)[tile]["last:category"] == (7, "fuel")
    # idle for longer than the window but within the TTL: a real zero, not a missing value
    idle = row_of(view, "idle", f"{now - 3 * HOUR} {tile}".encode(), [], now)
    assert idle.status == "present" and idle.values["txn_count_1h"] == 0


def test_packed_partials_round_trip_exactly() -> None:
    folder = aggregations.Folder(ALL_KINDS)
    for seed in range(5):
        partial: aggregations.Partial = {}
        for e in events(40, seed=seed):
            folder.fold(partial, e, int(e["ts"]))  # type: ignore[call-overload]
        assert unpack(pack(partial)) == partial
    assert unpack(pack({"last:x": (5, 'a "quoted"\nline = 1')}))["last:x"] == (5, 'a "quoted"\nline = 1')


def test_folder_matches_partial_of_and_merge() -> None:
    evs = events(200, seed=9)
    folder = aggregations.Folder(ALL_KINDS)
    folded: aggregations.Partial = {}
    for e in evs:
        folder.fold(folded, e, int(e["ts"]))  # type: ignore[call-overload]
    assert folded == aggregations.merge(aggregations.partial_of(ALL_KINDS, e) for e in evs)


def test_fold_partition_splits_like_split_late_per_view() -> None:
    strict = replace(ALL_KINDS, name="strict", allowed_lateness_ms=MIN)
    loose = replace(
        ALL_KINDS, name="loose", kind="lifetime", window_ms=0, tile_ms=0, allowed_lateness_ms=HOUR
    )
    records = list(enumerate(events(300, seed=6, span=3 * HOUR)))
    folded = tiles.fold_partition([strict, loose], records, tiles.NO_WATERMARK)
    for view in (strict, loose):
        on_time, late, watermark = tiles.split_late(view, records, tiles.NO_WATERMARK)
        assert folded.late[view.name] == late and folded.watermark == watermark
        assert folded.on_time[view.name] == len(on_time)
        want = tiles.batch_deltas(view, [e for _, e in on_time])
        assert folded.deltas[view.name] == want
    assert len(folded.late["strict"]) > len(folded.late["loose"]) > 0


def test_shipped_definitions_load() -> None:
    assert {"card_activity", "card_daily", "card_profile"} <= set(VIEWS)
    kinds = {a.kind for v in VIEWS.values() for a in v.aggregations}
    assert kinds == {"count", "sum", "mean", "max", "min", "stddev", "distinct", "quantile", "last"}


BASE = """
[[view]]
name = "v"
entity = "card_id"
source = "events"
event_time = "ts"
window = "1h"
tile = "1m"
features = [ {FEATURE} ]
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            BASE.replace("{FEATURE}", '{ name = "a", agg = "median", field = "amount" }'),
            "unknown aggregation",
        ),
        (BASE.replace("{FEATURE}", '{ name = "a", agg = "sum", field = "amountt" }'), "'amountt' is not in"),
        (
            BASE.replace("{FEATURE}", '{ name = "a", agg = "mean", field = "category" }'),
            "needs a numeric field",
        ),
        (
            BASE.replace("{FEATURE}", '{ name = "a", agg = "quantile", field = "amount" }'),
            "q between 0 and 1",
        ),
        (
            BASE.replace("{FEATURE}", '{ name = "a", agg = "count", colour = "red" }'),
            "unknown keys ['colour']",
        ),
        (
            BASE.replace("{FEATURE}", '{ name = "a", agg = "count" }, { name = "a", agg = "count" }'),
            "repeated",
        ),
        (
            BASE.replace('"1h"', '"1 hour"').replace("{FEATURE}", '{ name = "a", agg = "count" }'),
            "not a duration",
        ),
        (
            BASE.replace('"1m"', '"7m"').replace("{FEATURE}", '{ name = "a", agg = "count" }'),
            "multiple of tile",
        ),
        (
            BASE.replace('"card_id"', '"card"').replace("{FEATURE}", '{ name = "a", agg = "count" }'),
            "entity 'card'",
        ),
        (
            BASE.replace('"events"', '"dead-letter"').replace("{FEATURE}", '{ name = "a", agg = "count" }'),
            "source",
        ),
    ],
)
def test_invalid_definitions_name_view_feature_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "views.toml"
    path.write_text(text)
    with pytest.raises(FeatureError, match="feature view 'v'") as err:
        load(path)
    assert message in str(err.value)


def test_distinct_sketch_is_exact_when_small_bounded_and_close_when_large() -> None:
    k = aggregations.DISTINCT_K
    small = {aggregations.value_hash(f"m{i}") for i in range(k - 1)}
    assert aggregations.distinct_estimate(small) == k - 1
    rng = random.Random(3)
    values = [f"v{rng.random()}" for _ in range(20_000)]
    parts = [{aggregations.value_hash(v) for v in values[i::7]} for i in range(7)]
    merged: set[int] = set()
    for part in parts:  # any grouping gives the same sketch: the K smallest of the union
        merged = (
            aggregations.merge_slot("d:x", merged, aggregations.kmv(part))
            if merged
            else aggregations.kmv(part)
        )
    assert merged == aggregations.kmv(set().union(*parts)) and len(merged) == k
    assert aggregations.distinct_estimate(merged) == pytest.approx(20_000, rel=0.2)  # ~3 standard errors
    packed = unpack(pack({"d:x": set().union(*parts)}))
    assert packed["d:x"] == merged  # stored bounded, whatever a tile saw
