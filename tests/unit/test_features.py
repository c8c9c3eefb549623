"""Window math and feature definitions."""

from __future__ import annotations

import random

import pytest

from features import tiles
from features.definitions import CARD_ACTIVITY, Aggregation, FeatureView
from features.store import row_from_hash
from infra.errors import FeatureError

VIEW = CARD_ACTIVITY
HOUR, MIN = 3_600_000, 60_000


def events(n: int, seed: int = 1, start: int = 1_700_000_000_000) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [
        {
            "card_id": f"c{rng.randrange(5)}",
            "amount": round(rng.uniform(1, 500), 2),
            "ts": start + rng.randrange(2 * HOUR),
        }
        for _ in range(n)
    ]


def test_tile_boundaries() -> None:
    assert tiles.tile_of(MIN * 5 + 1, MIN) == MIN * 5
    assert tiles.tile_of(MIN * 5, MIN) == MIN * 5
    # the window ending at now holds exactly window/tile tiles, the current one included
    now = 10 * HOUR + 30_000
    assert tiles.tile_of(now, MIN) - tiles.first_tile(VIEW, now) == HOUR - MIN


def test_merge_is_associative_and_commutative() -> None:
    rng = random.Random(3)
    parts = [tiles.partial_of(VIEW, {"amount": rng.uniform(0, 100)}) for _ in range(30)]
    left = tiles.merge([tiles.merge(parts[:10]), tiles.merge(parts[10:])])
    right = tiles.merge([parts[0], tiles.merge(parts[1:20]), tiles.merge(parts[20:])])
    shuffled = parts[:]
    rng.shuffle(shuffled)
    for other in (right, tiles.merge(shuffled)):
        assert other.keys() == left.keys()
        for k in left:
            assert other[k] == pytest.approx(left[k], rel=1e-12)


def test_window_values_match_brute_force() -> None:
    evs = events(500)
    now = 1_700_000_000_000 + 2 * HOUR
    deltas = tiles.batch_deltas(VIEW, evs)
    for card, delta in deltas.items():
        got = tiles.window_values(VIEW, delta.tiles, now)
        lo = tiles.first_tile(VIEW, now)
        inside = [e["amount"] for e in evs if e["card_id"] == card and lo <= e["ts"] <= now]
        assert got["txn_count_1h"] == len(inside)
        assert got["amount_sum_1h"] == pytest.approx(sum(inside))
        assert got["amount_mean_1h"] == pytest.approx(sum(inside) / len(inside))


def test_batches_split_anywhere_give_the_same_tiles() -> None:
    evs = events(300, seed=9)
    whole = tiles.batch_deltas(VIEW, evs)
    a, b = tiles.batch_deltas(VIEW, evs[:137]), tiles.batch_deltas(VIEW, evs[137:])
    for card, delta in whole.items():
        merged: dict[int, dict[str, float]] = {}
        for part in (a, b):
            for t, p in part[card].tiles.items() if card in part else ():
                merged[t] = tiles.merge([merged.get(t, {}), p])
        assert merged.keys() == delta.tiles.keys()
        for t in merged:
            assert merged[t]["n"] == delta.tiles[t]["n"]
            assert merged[t]["s:amount"] == pytest.approx(delta.tiles[t]["s:amount"])


def test_missing_and_expired_rows_are_never_present() -> None:
    now = 10 * HOUR
    missing = row_from_hash(VIEW, "nobody", {}, now)
    assert missing.status == "missing" and missing.values["txn_count_1h"] == 0
    old_tile = now - 2 * HOUR
    expired = row_from_hash(VIEW, "old", {b"ts": str(old_tile).encode(), f"{old_tile}:n".encode(): b"3"}, now)
    assert expired.status == "expired"
    assert expired.values == {"txn_count_1h": 0.0, "amount_sum_1h": 0.0, "amount_mean_1h": 0.0}
    fresh_tile = tiles.tile_of(now, MIN)
    row = row_from_hash(
        VIEW,
        "x",
        {
            b"ts": str(now - 5).encode(),
            f"{fresh_tile}:n".encode(): b"2",
            f"{fresh_tile}:s:amount".encode(): b"30",
        },
        now,
    )
    assert row.status == "present" and row.values["amount_mean_1h"] == 15.0 and row.age_ms == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_ms": 90_000, "tile_ms": 60_000}, "multiple of tile_ms"),
        ({"aggregations": (Aggregation("a", "count"), Aggregation("a", "count"))}, "unique"),
        ({"aggregations": (Aggregation("m", "mean"),)}, "'m'"),
        ({"aggregations": (Aggregation("m", "median", "amount"),)}, "unknown kind"),  # type: ignore[arg-type]
    ],
)
def test_invalid_definitions_name_the_problem(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "name": "v",
        "entity": "card_id",
        "source": "events",
        "event_time": "ts",
        "window_ms": HOUR,
        "tile_ms": MIN,
        "aggregations": (Aggregation("n", "count"),),
    }
    with pytest.raises(FeatureError, match=message) as err:
        FeatureView(**{**base, **kwargs})  # type: ignore[arg-type]
    assert "'v'" in str(err.value)
