"""Mergeable aggregations, window math, lateness, admission of poison records (pure code)."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from confluent_kafka import Message

from features import aggregations, tiles
from features.admission import FUTURE_EVENT, MISSING_FIELD, NON_FINITE, WRONG_TYPE, Admission
from features.commands import feature_listing
from features.processor import FeatureFolder, PartitionBatch, SourceRecord, plan_sources, split_messages
from features.store import pack, parse_tiles, read_calls, row_of, slot_of, unpack
from infra.deadletter import MemoryDeadLetters
from infra.settings import CommonSettings
from schemas import codec
from schemas.definitions import Entity, Feature, FeatureView, Project, Source

HOUR, MIN, DAY = 3_600_000, 60_000, 86_400_000
START = 1_700_000_000_000

SCHEMA = {
    "type": "record",
    "name": "Visit",
    "namespace": "tide.test",
    "fields": [
        {"name": "visit_id", "type": "string"},
        {"name": "user", "type": "string"},
        {"name": "shop", "type": "long"},
        {"name": "amount", "type": "double"},
        {"name": "page", "type": "string"},
        {"name": "kind", "type": ["null", "string"], "default": None},
        {"name": "ts", "type": "long"},
    ],
}
VISITS = Source("visits", SCHEMA, key="user", event_time="ts", topic="visits", max_future_skew="1h")
USER = Entity("user", "user")
SHOP = Entity("shop", "shop")

ALL_KINDS = FeatureView(
    name="all_kinds",
    source=VISITS,
    entity=USER,
    kind="sliding",
    window="1h",
    tile="1m",
    features=[
        Feature("n", "count"),
        Feature("total", "sum", "amount"),
        Feature("avg", "mean", "amount"),
        Feature("lo", "min", "amount"),
        Feature("hi", "max", "amount"),
        Feature("sd", "stddev", "amount"),
        Feature("latest", "last", "page"),
        Feature("pages", "distinct", "page"),
        Feature("p90", "quantile", "amount", q=0.9),
        Feature("p50", "quantile", "amount", q=0.5),
    ],
)
PER_SHOP = FeatureView(
    name="per_shop", source=VISITS, entity=SHOP, kind="lifetime", features=[Feature("visits", "count")]
)


def events(n: int, seed: int = 1, span: int = 2 * HOUR, users: int = 5) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "visit_id": f"v{seed}-{i}",
            "user": f"u{rng.randrange(users)}",
            "shop": rng.randrange(3),
            "amount": round(rng.lognormvariate(3, 1), 2),
            "page": f"p{rng.randrange(40)}",
            "kind": rng.choice(["a", "b", None]),
            "ts": START + rng.randrange(span),
        }
        for i in range(n)
    ]


def brute_force(evs: list[dict[str, Any]], q: float) -> dict[str, Any]:
    amounts = [float(e["amount"]) for e in evs]
    rank = max(math.ceil(q * len(amounts)), 1)
    newest = max(evs, key=lambda e: int(e["ts"]))
    return {
        "n": len(evs),
        "total": sum(amounts),
        "avg": statistics.fmean(amounts),
        "lo": min(amounts),
        "hi": max(amounts),
        "sd": statistics.pstdev(amounts),
        "latest": newest["page"],
        "pages": len({e["page"] for e in evs}),
        "quantile": sorted(amounts)[rank - 1],
    }


@pytest.mark.parametrize(
    ("view", "now", "first", "last"),
    [
        (ALL_KINDS, 10 * HOUR + 30_000, 9 * HOUR + MIN, 10 * HOUR),
        (replace(ALL_KINDS, kind="tumbling", window="1d", tile=None), 3 * DAY + 5, 3 * DAY, 3 * DAY),
        (replace(ALL_KINDS, kind="lifetime", window=None, tile=None), 3 * DAY + 5, 0, 0),
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
    for user, delta in tiles.batch_deltas(ALL_KINDS, evs).items():
        got = tiles.window_values(ALL_KINDS, delta.tiles, now)
        inside = [e for e in evs if e["user"] == user and lo <= e["ts"] <= now]
        want = brute_force(inside, 0.9)
        for name in ("n", "total", "avg", "lo", "hi", "sd"):
            assert got[name] == pytest.approx(want[name], rel=1e-9), name
        assert got["pages"] == want["pages"]
        assert got["latest"] == want["latest"]
        # the sketch's quantile lies within ALPHA (relative) of the true one
        assert got["p90"] == pytest.approx(want["quantile"], rel=aggregations.ALPHA * 1.01)
        assert got["p50"] == pytest.approx(
            brute_force(inside, 0.5)["quantile"], rel=aggregations.ALPHA * 1.01
        )


def test_empty_window_serves_declared_defaults() -> None:
    values = tiles.window_values(ALL_KINDS, {}, START)
    assert values["n"] == 0 and values["total"] == 0.0 and values["pages"] == 0.0
    assert values["lo"] is None and values["latest"] is None and values["p90"] is None


def test_lateness_is_decided_in_partition_order() -> None:
    view = replace(ALL_KINDS, allowed_lateness=10_000)
    records: list[tuple[int, dict[str, Any]]] = [
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
    view = replace(ALL_KINDS, ttl="1d")
    now = 10 * DAY
    missing = row_of(view, "nobody", None, [], now)
    assert missing.status == "missing" and missing.values["n"] == 0
    stale_tile = tiles.tile_of(view, now - 2 * DAY)
    expired = row_of(view, "old", f"{now - 2 * DAY} {stale_tile}".encode(), [], now)
    assert expired.status == "expired" and expired.values["n"] == 0
    tile = tiles.tile_of(view, now)
    packed = [str(tile).encode(), b'n=2\ns:amount=30.0\nlast:page=7 "home"\nd:page=[1,2]']
    row = row_of(view, "x", f"{now - 5} {tile}".encode(), packed, now)
    assert row.status == "present" and row.age_ms == 5
    assert row.values["avg"] == 15.0 and row.values["pages"] == 2.0 and row.values["latest"] == "home"
    assert parse_tiles(packed)[tile]["last:page"] == (7, "home")
    # idle for longer than the window but within the TTL: a real zero, not a missing value
    idle = row_of(view, "idle", f"{now - 3 * HOUR} {tile}".encode(), [], now)
    assert idle.status == "present" and idle.values["n"] == 0


def test_packed_partials_round_trip_exactly() -> None:
    folder = aggregations.Folder(ALL_KINDS)
    for seed in range(5):
        partial: aggregations.Partial = {}
        for e in events(40, seed=seed):
            folder.fold(partial, e, int(e["ts"]))
        assert unpack(pack(partial)) == partial
    assert unpack(pack({"last:x": (5, 'a "quoted"\nline = 1')}))["last:x"] == (5, 'a "quoted"\nline = 1')


def test_folder_matches_partial_of_and_merge() -> None:
    evs = events(200, seed=9)
    folder = aggregations.Folder(ALL_KINDS)
    folded: aggregations.Partial = {}
    for e in evs:
        folder.fold(folded, e, int(e["ts"]))
    assert folded == aggregations.merge(aggregations.partial_of(ALL_KINDS, e) for e in evs)


def test_fold_partition_splits_like_split_late_per_view() -> None:
    strict = replace(ALL_KINDS, name="strict", allowed_lateness="1m")
    loose = replace(ALL_KINDS, name="loose", kind="lifetime", window=None, tile=None, allowed_lateness="1h")
    records = list(enumerate(events(300, seed=6, span=3 * HOUR)))
    folded = tiles.fold_partition([strict, loose, PER_SHOP], records, tiles.NO_WATERMARK)
    for view in (strict, loose, PER_SHOP):
        on_time, late, watermark = tiles.split_late(view, records, tiles.NO_WATERMARK)
        assert folded.late[view.ref] == late and folded.watermark == watermark
        assert folded.on_time[view.ref] == len(on_time)
        assert folded.deltas[view.ref] == tiles.record_deltas(view, on_time)
        for entity, delta in folded.deltas[view.ref].items():  # the positions the store checks per key
            mine = [p for p, e in on_time if str(e[view.entity_key]) == entity]
            assert (delta.first, delta.last) == (mine[0], mine[-1])
    assert len(folded.late["strict@1"]) > len(folded.late["loose@1"]) > 0
    assert set(folded.deltas["per_shop@1"]) == {"0", "1", "2"}  # kept per its own entity key


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


def test_huge_finite_values_fold_without_raising() -> None:
    (event,) = events(1)
    event["amount"] = 1e300  # its square overflows: inf in the partial, never an OverflowError
    partial: aggregations.Partial = {}
    aggregations.Folder(ALL_KINDS).fold(partial, event, int(event["ts"]))
    assert partial["q:amount"] == math.inf and partial["s:amount"] == 1e300


# --- admission: poison records ------------------------------------------------------------------------------

NOW = START + 10 * HOUR
GOOD = {"visit_id": "v", "user": "u1", "shop": 2, "amount": 5.0, "page": "p", "kind": None, "ts": NOW}


@pytest.mark.parametrize(
    ("change", "error_type", "words"),
    [
        ({"amount": math.nan}, NON_FINITE, ["'amount'", "nan", "view 'all_kinds'"]),
        ({"amount": math.inf}, NON_FINITE, ["'amount'", "inf"]),
        ({"amount": -math.inf}, NON_FINITE, ["'amount'", "-inf"]),
        ({"amount": None}, MISSING_FIELD, ["'amount' is null"]),
        ({"amount": "12.5"}, WRONG_TYPE, ["'amount' is a str", "not a number"]),
        ({"user": None}, MISSING_FIELD, ["'user' is null", "entity key of view 'all_kinds'"]),
        ({"user": 1.5}, WRONG_TYPE, ["'user' is a float"]),
        ({"shop": None}, MISSING_FIELD, ["entity key of view 'per_shop'"]),
        ({"ts": None}, MISSING_FIELD, ["'ts' is null", "event time of source 'visits'"]),
        ({"ts": float(NOW)}, WRONG_TYPE, ["'ts' is a float"]),
        ({"ts": True}, WRONG_TYPE, ["'ts' is a bool"]),
        ({"ts": NOW + HOUR + 1}, FUTURE_EVENT, ["3600001 ms ahead", "allows 3600000 ms", "watermark"]),
    ],
)
def test_poison_records_are_rejected_with_the_reason(
    change: dict[str, Any], error_type: str, words: list[str]
) -> None:
    admission = Admission.of_source([ALL_KINDS, PER_SHOP])
    assert admission.check(GOOD, NOW) is None
    rejection = admission.check({**GOOD, **change}, NOW)
    assert rejection is not None and rejection.error_type == error_type
    for word in words:
        assert word in rejection.reason


def test_admission_accepts_what_views_can_fold() -> None:
    admission = Admission.of_source([ALL_KINDS, PER_SHOP])
    assert admission.check({**GOOD, "ts": NOW + HOUR}, NOW) is None  # exactly the allowed skew
    assert admission.check({**GOOD, "amount": 3, "page": None}, NOW) is None  # ints; null is a distinct value
    assert admission.check({**GOOD, "ts": NOW + DAY}, None) is None  # no wall clock: no future check
    missing = {k: v for k, v in GOOD.items() if k != "page"}
    rejection = admission.check(missing, NOW)
    assert (
        rejection is not None
        and rejection.error_type == MISSING_FIELD
        and "'page' is missing" in rejection.reason
    )
    unread = Admission.of_source([PER_SHOP])  # a field no view reads is never checked
    assert unread.check({**GOOD, "amount": math.nan}, NOW) is None


def _message(topic: str, offset: int, value: bytes, partition: int = 0) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=b"u1", value=value)


def test_poison_and_future_records_are_dead_lettered_and_never_move_the_watermark() -> None:
    codec.register("visits", [SCHEMA])
    settings = CommonSettings(topic_prefix="x.")
    plans = plan_sources(settings, [ALL_KINDS, PER_SHOP])
    assert list(plans) == ["x.visits"] and [v.name for v in plans["x.visits"].views] == [
        "all_kinds",
        "per_shop",
    ]
    now = NOW
    records = [
        {**GOOD, "visit_id": "a", "ts": now - 10 * MIN},
        {**GOOD, "visit_id": "nan", "amount": math.nan},
        {**GOOD, "visit_id": "future", "ts": now + 2 * HOUR},
        {**GOOD, "visit_id": "b", "ts": now - 9 * MIN},
    ]
    msgs = [_message("x.visits", i, codec.encode("visits", r)) for i, r in enumerate(records)]
    msgs.append(_message("x.visits", 4, b"not avro"))
    dlq = MemoryDeadLetters()
    (batch,) = split_messages(plans, msgs, dlq, now)
    assert batch.last == 4 and [r.event["visit_id"] for r in batch.records] == ["a", "b"]
    assert [(d.error_type, d.offset, d.stage, d.source_topic) for d in dlq.letters] == [
        (NON_FINITE, 1, "features", "x.visits"),
        (FUTURE_EVENT, 2, "features", "x.visits"),
        ("SchemaError", 4, "features", "x.visits"),
    ]
    headers = dict(dlq.letters[1].headers())
    assert headers["tide.error_type"] == b"FutureEvent" and headers["tide.source.offset"] == b"2"
    assert b"ahead of the wall clock" in headers["tide.error"]  # type: ignore[operator]
    folded = tiles.fold_partition(
        batch.views, [(r.offset, r.event) for r in batch.records], tiles.NO_WATERMARK
    )
    assert folded.watermark == now - 9 * MIN  # the future event did not move it
    assert not any(folded.late.values())


class FakeWriter:
    namespace = ""

    def positions_of(self, pairs: Sequence[Any]) -> list[tuple[int, int]]:
        return [(-1, tiles.NO_WATERMARK)] * len(pairs)


def test_a_record_that_still_fails_to_fold_is_dead_lettered_not_fatal() -> None:
    dlq = MemoryDeadLetters()
    folder = FeatureFolder(FakeWriter(), dlq)  # type: ignore[arg-type]
    good = [SourceRecord(i, {**GOOD, "ts": NOW + i}, b"k", b"v") for i in range(3)]
    broken = SourceRecord(3, {**GOOD, "amount": object(), "ts": NOW + 3}, b"k", b"raw")  # past admission
    batch = PartitionBatch("x.visits", 0, [ALL_KINDS, PER_SHOP], [*good, broken], last=3)
    flight = folder.prepare([batch])
    (planned,) = flight.work
    folded = planned.fold
    assert folded.on_time["all_kinds@1"] == 3 and folded.watermark == NOW + 2
    assert [(d.offset, d.value, d.error_type) for d in dlq.letters] == [(3, b"raw", "TypeError")]
    assert "cannot be folded" in dlq.letters[0].error


# --- reads and listing --------------------------------------------------------------------------------------


def test_read_calls_ask_each_key_once_one_call_or_one_per_slot() -> None:
    daily = replace(ALL_KINDS, name="daily", kind="tumbling", window="1d", tile=None)
    v2 = replace(ALL_KINDS, window="2h", version=2)
    pairs = [
        (ALL_KINDS, "u1"),
        (daily, "u1"),
        (ALL_KINDS, "u1"),
        (PER_SHOP, "2"),
        (ALL_KINDS, "u2"),
        (v2, "u1"),
    ]
    (call,) = read_calls(pairs, NOW, "ns.")
    keys, windows = call
    assert keys == [
        "ns.tide:f:{user=u1}:all_kinds@1",
        "ns.tide:f:{user=u1}:daily@1",
        "ns.tide:f:{shop=2}:per_shop@1",
        "ns.tide:f:{user=u2}:all_kinds@1",
        "ns.tide:f:{user=u1}:all_kinds@2",
    ]
    assert windows[1] == [tiles.tile_of(daily, NOW)] * 2
    assert windows[4] == [tiles.first_tile(v2, NOW), tiles.tile_of(v2, NOW)]
    clustered = read_calls(pairs, NOW, "ns.", cluster=True)
    assert sorted(k for c in clustered for k in c[0]) == sorted(keys)
    for call_keys, _ in clustered:  # every call touches one slot; an entity's keys share it
        assert len({slot_of(k) for k in call_keys}) == 1
    assert len(clustered) == 3


def test_feature_listing_names_every_feature_of_every_view() -> None:
    project = Project.of("visits_project", [ALL_KINDS, PER_SHOP])
    listing = feature_listing(project)
    assert [(f["view"], f["feature"]) for f in listing] == [
        ("all_kinds", a.name) for a in ALL_KINDS.aggregations
    ] + [("per_shop", "visits")]
    assert listing[0]["entity_key"] == "user" and listing[-1]["source"] == "visits"


def test_the_store_retry_loop_retries_refusals_then_gives_up() -> None:
    from features.store import apply_until_settled
    from infra.errors import StreamError

    tries: list[list[str]] = []

    def refuse_once(todo: list[str]) -> list[str]:
        tries.append(list(todo))
        return ["b"] if len(tries) == 1 else []

    apply_until_settled(["a", "b"], refuse_once, "test")
    assert tries == [["a", "b"], ["b"]]
    with pytest.raises(StreamError, match="kept refusing batches of stubborn"):
        apply_until_settled(["a"], lambda todo: todo, "stubborn", attempts=3)
