"""Point-in-time training sets: values as of each label's time, through the online window code."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import fastavro
import pytest

from schemas.definitions import VIEWS
from features.training import point_in_time, write_avro

ACTIVITY = VIEWS["card_activity"]
PROFILE = VIEWS["card_profile"]
MIN = 60_000
T0 = 1_700_000_000_000


def stream(n: int, seed: int = 2) -> list[dict[str, object]]:
    rng = random.Random(seed)
    ts = T0
    out = []
    for i in range(n):
        ts += rng.randrange(0, 20_000)
        out.append(
            {
                "event_id": f"e{i}",
                "card_id": f"c{rng.randrange(4)}",
                "amount": float(rng.randrange(1, 500)),
                "merchant_id": f"m{rng.randrange(9)}",
                "category": rng.choice(["a", "b"]),
                "country": rng.choice(["US", "FR"]),
                "ts": ts,
            }
        )
    return out


def label_for(event: dict[str, object]) -> dict[str, object]:
    return {
        "event_id": event["event_id"],
        "card_id": event["card_id"],
        "is_fraud": False,
        "event_ts": event["ts"],
        "ts": int(event["ts"]) + 10 * MIN,
    }  # type: ignore[call-overload]


def test_each_row_uses_only_earlier_events() -> None:
    events = stream(600)
    labels = [label_for(e) for e in events[::7]]
    rows = point_in_time([ACTIVITY, PROFILE], {0: events[::2], 1: events[1::2]}, labels)
    assert len(rows) == len(labels)
    for row in rows:
        t = int(row["event_ts"])
        before = [e for e in events if e["card_id"] == row["card_id"] and int(e["ts"]) < t]  # type: ignore[call-overload]
        in_hour = [e for e in before if int(e["ts"]) >= (t - 1) - (t - 1) % MIN - 59 * MIN]  # type: ignore[call-overload]
        assert row["txn_count_lifetime"] == len(before)
        assert row["txn_count_1h"] == len(in_hour)
        assert row["amount_sum_1h"] == pytest.approx(sum(float(e["amount"]) for e in in_hour))  # type: ignore[arg-type]
        assert row["countries_lifetime"] == len({e["country"] for e in before})


def test_future_events_change_nothing() -> None:
    events = stream(300)
    for labelled in events[100:200:20]:
        label = label_for(labelled)
        base = point_in_time([ACTIVITY, PROFILE], {0: events}, [label])
        # the card spends wildly at the same ms as the labelled event and right after it
        t = int(labelled["ts"])  # type: ignore[call-overload]
        future = [
            dict(labelled, event_id="f1", amount=1e6, ts=t),
            dict(labelled, event_id="f2", amount=1e6, ts=t + 1),
        ]
        merged = sorted(events + future, key=lambda e: int(e["ts"]))  # type: ignore[call-overload]
        assert point_in_time([ACTIVITY, PROFILE], {0: merged}, [label]) == base


def test_late_events_are_left_out_as_online() -> None:
    view = replace(ACTIVITY, allowed_lateness_ms=MIN)
    events = [
        {"card_id": "c", "amount": 1.0, "merchant_id": "m", "ts": T0 + 10 * MIN},
        {"card_id": "c", "amount": 5.0, "merchant_id": "m", "ts": T0},
    ]  # 10 min late: dropped online
    label = {"card_id": "c", "event_id": "x", "is_fraud": True, "event_ts": T0 + 20 * MIN, "ts": 0}
    (row,) = point_in_time([view], {0: events}, [label])
    assert row["txn_count_1h"] == 1 and row["amount_sum_1h"] == 1.0


def test_written_file_reads_back(tmp_path: Path) -> None:
    events = stream(100)
    rows = point_in_time([ACTIVITY, PROFILE], {0: events}, [label_for(e) for e in events[50:60]])
    path = write_avro(rows, tmp_path / "set.avro")
    with path.open("rb") as fh:
        back = list(fastavro.reader(fh))
    assert len(back) == 10
    assert (
        back[3]["txn_count_1h"] == rows[3]["txn_count_1h"]
        and back[3]["last_category"] == rows[3]["last_category"]
    )
    assert back[0]["is_fraud"] is False
