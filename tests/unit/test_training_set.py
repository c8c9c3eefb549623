"""Point-in-time training sets: values as of each labelled event's time, through the online window code,
for any model of any project (views over the request source and over the labels source)."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import fastavro
import pytest

from features import tiles
from features.training import Example, examples_for, write_avro
from infra.errors import FeatureError
from schemas.definitions import Entity, Feature, FeatureView, Labels, Model, Project, Source

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
T0 = 1_700_000_000_000

VISIT = {
    "type": "record",
    "name": "Visit",
    "namespace": "tide.test",
    "fields": [
        {"name": "visit_id", "type": "string"},
        {"name": "user", "type": "string"},
        {"name": "amount", "type": "double"},
        {"name": "page", "type": "string"},
        {"name": "ts", "type": "long"},
    ],
}
OUTCOME = {
    "type": "record",
    "name": "Outcome",
    "namespace": "tide.test",
    "fields": [
        {"name": "visit_id", "type": "string"},
        {"name": "user", "type": "string"},
        {"name": "converted", "type": "boolean"},
        {"name": "spent", "type": "double"},
        {"name": "segment", "type": "string"},
        {"name": "ts", "type": "long"},
    ],
}
VISITS = Source("visits", VISIT, key="user", event_time="ts")
OUTCOMES = Source("outcomes", OUTCOME, key="user", event_time="ts")
USER = Entity("user", "user")
ACTIVITY = FeatureView(
    name="activity",
    source=VISITS,
    entity=USER,
    window="1h",
    tile="1m",
    allowed_lateness="5m",
    features=[
        Feature("n_1h", "count"),
        Feature("total_1h", "sum", "amount"),
        Feature("last_page", "last", "page"),
    ],
)
HISTORY = FeatureView(
    name="history",
    source=VISITS,
    entity=USER,
    kind="lifetime",
    ttl="1d",
    features=[Feature("visits_total", "count")],
)
# a view over the labels source: what is known of the user's outcomes so far
OUTCOME_RATE = FeatureView(
    name="outcome_rate",
    source=OUTCOMES,
    entity=USER,
    window="7d",
    tile="1h",
    features=[Feature("conv_rate_7d", "mean", "converted"), Feature("outcomes_7d", "count")],
)
CONVERTED = Labels("converted", OUTCOMES, key="visit_id", target="converted", task="binary")
MODEL = Model(
    name="conversion",
    task="binary",
    request=VISITS,
    request_fields=["amount", "page"],
    features=[
        "activity.n_1h",
        "activity.total_1h",
        "activity.last_page",
        "history.visits_total",
        "outcome_rate.conv_rate_7d",
        "outcome_rate.outcomes_7d",
    ],
    labels=CONVERTED,
    learner="model:new",
)
PROJECT = Project.of("shop", [MODEL, ACTIVITY, HISTORY, OUTCOME_RATE])


def visits(n: int, seed: int = 2, users: int = 4) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    ts = T0
    out = []
    for i in range(n):
        ts += rng.randrange(0, 20_000)
        out.append(
            {
                "visit_id": f"v{i}",
                "user": f"u{rng.randrange(users)}",
                "amount": float(rng.randrange(1, 500)),
                "page": rng.choice(["home", "cart"]),
                "ts": ts,
            }
        )
    return out


def outcome(visit: dict[str, Any], delay: int = 10 * MIN, converted: bool | None = None) -> dict[str, Any]:
    return {
        "visit_id": visit["visit_id"],
        "user": visit["user"],
        "converted": converted if converted is not None else visit["amount"] > 250,
        "spent": visit["amount"] / 2,
        "segment": "big" if visit["amount"] > 250 else "small",
        "ts": visit["ts"] + delay,
    }


def in_window(ts: int, t: int, window: int, tile: int) -> bool:
    """Whether an event at ``ts`` is in the sliding window read at ``t - 1`` (strictly before ``t``)."""
    as_of = t - 1
    return as_of - as_of % tile - window + tile <= ts < t


def test_each_example_uses_only_earlier_events_of_each_source() -> None:
    events = visits(600)
    labels = [outcome(e) for e in events[::3]]
    examples = examples_for(
        PROJECT, MODEL, {0: events[::2], 1: events[1::2]}, {0: labels[::2], 1: labels[1::2]}
    )
    assert len(examples) == len(labels)
    assert [e.ts for e in examples] == sorted(e.ts for e in examples)
    by_id = {e["visit_id"]: e for e in events}
    for example in examples:
        event = by_id[example.key]
        t, user = event["ts"], event["user"]
        assert list(example.x) == list(MODEL.input_names) and example.ts == t
        assert example.x["amount"] == event["amount"] and example.x["page"] == event["page"]
        before = [e for e in events if e["user"] == user and e["ts"] < t]
        in_hour = [e for e in before if in_window(e["ts"], t, HOUR, MIN)]
        assert example.x["visits_total"] == len(before)
        assert example.x["n_1h"] == len(in_hour)
        assert example.x["total_1h"] == pytest.approx(sum(e["amount"] for e in in_hour))
        assert example.x["last_page"] == (max(in_hour, key=lambda e: e["ts"])["page"] if in_hour else None)
        known = [lab for lab in labels if lab["user"] == user and in_window(lab["ts"], t, 7 * DAY, HOUR)]
        assert example.x["outcomes_7d"] == len(known)
        rate = sum(lab["converted"] for lab in known) / len(known) if known else 0.0
        assert example.x["conv_rate_7d"] == pytest.approx(rate)
        assert example.y is (event["amount"] > 250)
    assert any(e.x["outcomes_7d"] > 0 for e in examples), "the labels view must be exercised"


def test_future_events_and_labels_change_nothing() -> None:
    events = visits(300)
    labels = [outcome(e) for e in events]
    for labelled in events[100:200:20]:
        label = next(lab for lab in labels if lab["visit_id"] == labelled["visit_id"])
        base = examples_for(PROJECT, MODEL, {0: events}, [label])
        t = labelled["ts"]
        # the user spends wildly at the same ms as the labelled event and right after it, and an
        # outcome becomes known at that very moment
        future = [
            dict(labelled, visit_id="f1", amount=1e6, ts=t),
            dict(labelled, visit_id="f2", amount=1e6, ts=t + 1),
        ]
        merged = sorted(events + future, key=lambda e: e["ts"])
        late_news = [label, dict(label, visit_id="f1", ts=t), dict(label, visit_id="f2", ts=t + 1)]
        got = examples_for(PROJECT, MODEL, {0: merged}, late_news)
        assert [e for e in got if e.key == labelled["visit_id"]] == base


def test_late_and_poison_events_are_left_out_as_online() -> None:
    events = [
        {"visit_id": "a", "user": "u", "amount": 1.0, "page": "home", "ts": T0 + 10 * MIN},
        {"visit_id": "b", "user": "u", "amount": 5.0, "page": "cart", "ts": T0},  # 10 min late: dropped
        {"visit_id": "c", "user": "u", "amount": math.nan, "page": "cart", "ts": T0 + 11 * MIN},  # poison
        {"visit_id": "d", "user": "u", "amount": 2.0, "page": "home", "ts": T0 + 20 * MIN},
    ]
    (example,) = examples_for(PROJECT, MODEL, {0: events}, [outcome(events[3])])
    assert example.x["n_1h"] == 1 and example.x["total_1h"] == 1.0 and example.x["visits_total"] == 1


def test_expired_entities_get_defaults_as_serving_does() -> None:
    old = {"visit_id": "a", "user": "u", "amount": 1.0, "page": "home", "ts": T0}
    now = {"visit_id": "b", "user": "u", "amount": 1.0, "page": "home", "ts": T0 + DAY + 2}
    soon = {"visit_id": "c", "user": "u", "amount": 1.0, "page": "home", "ts": T0 + DAY + 1}
    got = {e.key: e for e in examples_for(PROJECT, MODEL, {0: [old, now]}, [outcome(now)])}
    assert got["b"].x["visits_total"] == 0  # newest event older than the lifetime view's 1-day TTL
    got = {e.key: e for e in examples_for(PROJECT, MODEL, {0: [old, soon]}, [outcome(soon)])}
    assert got["c"].x["visits_total"] == 1  # read at t - 1: exactly the TTL old, still present


def test_join_keeps_the_newest_label_per_key_and_drops_labels_without_an_event() -> None:
    events = visits(20)
    labels = [
        outcome(events[3], delay=MIN, converted=True),
        outcome(events[3], delay=2 * MIN, converted=False),  # a correction: the newest counts
        dict(outcome(events[4]), visit_id="nowhere"),
    ]
    (example,) = examples_for(PROJECT, MODEL, {0: events}, labels)
    assert example.key == "v3" and example.y is False


@pytest.mark.parametrize(
    ("task", "target", "want"), [("regression", "spent", float), ("multiclass", "segment", str)]
)
def test_targets_follow_the_task(task: str, target: str, want: type) -> None:
    labels = Labels("outcome", OUTCOMES, key="visit_id", target=target, task=task)  # type: ignore[arg-type]
    model = replace(MODEL, name="m", task=task, labels=labels)
    project = Project.of("shop", [model, ACTIVITY, HISTORY, OUTCOME_RATE])
    events = visits(50)
    examples = examples_for(project, model, {0: events}, [outcome(e) for e in events])
    assert len(examples) == 50 and all(type(e.y) is want for e in examples)
    assert examples[7].y == outcome(events[7])[target]


def test_a_view_over_a_source_not_given_is_an_error() -> None:
    clicks = Source("clicks", dict(VISIT, name="Click"), key="user", event_time="ts", topic="clicks")
    view = FeatureView("clicks_1h", clicks, USER, window="1h", features=[Feature("clicks", "count")])
    model = replace(MODEL, name="m", features=["clicks_1h.clicks"])
    project = Project.of("shop", [model, view])
    with pytest.raises(FeatureError, match="source 'clicks'"):
        examples_for(project, model, {0: visits(5)}, [])
    click = {"visit_id": "c", "user": "u0", "amount": 0.0, "page": "x", "ts": T0}
    events = [dict(visits(1)[0], user="u0", ts=T0 + 1)]
    (example,) = examples_for(
        project, model, {0: events}, [outcome(events[0])], sources={"clicks": {0: [click]}}
    )
    assert example.x["clicks"] == 1


def test_written_file_reads_back(tmp_path: Path) -> None:
    events = visits(100)
    examples = examples_for(PROJECT, MODEL, {0: events}, [outcome(e) for e in events[50:60]])
    path = write_avro(PROJECT, MODEL, examples, tmp_path / "set.avro")
    with path.open("rb") as fh:
        back = list(fastavro.reader(fh))
    assert len(back) == 10
    assert list(back[0]) == ["visit_id", "ts", *MODEL.input_names, "converted"]
    assert back[3]["n_1h"] == examples[3].x["n_1h"] and back[3]["last_page"] == examples[3].x["last_page"]
    assert back[3]["visit_id"] == examples[3].key and back[3]["ts"] == examples[3].ts
    assert back[0]["converted"] is examples[0].y
    assert isinstance(examples[0], Example)
    assert tiles.NO_WATERMARK < 0  # the replay starts every partition without a watermark, as online


def test_a_replay_computes_the_view_versions_it_is_given() -> None:
    # version 2 of `activity` has a 10-minute window; version 1 (the 1h one) is kept for its models
    newer = replace(ACTIVITY, window="10m", version=2)
    project = replace(
        PROJECT, views={**PROJECT.views, "activity": newer}, previous_views={"activity@1": ACTIVITY}
    )
    events = visits(300)
    labels = [outcome(e) for e in events[200:]]
    as_v1 = examples_for(
        project, MODEL, {0: events}, labels, views=project.model_views(MODEL, {"activity": 1})
    )
    assert as_v1 == examples_for(PROJECT, MODEL, {0: events}, labels)  # what the v1-only project gave
    as_v2 = examples_for(project, MODEL, {0: events}, labels)  # default: the newest version
    assert as_v2 == examples_for(project, MODEL, {0: events}, labels, views=[newer, HISTORY, OUTCOME_RATE])
    assert [e.x["n_1h"] for e in as_v2] != [e.x["n_1h"] for e in as_v1]
    for example in as_v2:
        before = [e for e in events if in_window(e["ts"], example.ts, 10 * MIN, MIN)]
        assert example.x["n_1h"] == len(
            [e for e in before if e["user"] == events[int(str(example.key)[1:])]["user"]]
        )
    with pytest.raises(FeatureError, match="no version of view 'history'"):
        examples_for(project, MODEL, {0: events}, labels, views=[newer, OUTCOME_RATE])
