"""The fraud example's synthetic transaction stream."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from fastavro import parse_schema
from fastavro.validation import validate

from examples.fraud.driver.concept import CheckConfig, check
from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator

SCHEMAS = Path(__file__).resolve().parents[2] / "examples" / "fraud" / "schemas"


def schema(name: str) -> Any:
    return parse_schema(json.loads((SCHEMAS / name).read_text()))


def take(gen: TransactionGenerator, n: int) -> tuple[list[dict], list[dict]]:
    events, labels = [], []
    for _ in range(n):
        e, due = gen.next()
        events.append(e)
        labels.extend(due)
    return events, labels


def test_records_match_their_schemas_and_labels_arrive_later() -> None:
    gen = TransactionGenerator(GeneratorConfig(label_delay=50), clock=lambda: 1000.0)
    events, labels = take(gen, 500)
    transaction, label_schema = schema("transaction.avsc"), schema("label.avsc")
    for e in events:
        validate(e, transaction, raise_errors=True)
    for label in labels:
        validate(label, label_schema, raise_errors=True)
    assert len(labels) == 450  # the last 50 are still pending
    seq = {e["event_id"]: e["seq"] for e in events}
    assert [seq[label["event_id"]] for label in labels] == list(range(450))
    assert len(gen.drain()) == 50


def test_seeded_streams_repeat() -> None:
    a, _ = take(TransactionGenerator(GeneratorConfig(seed=3), clock=lambda: 0.0), 100)
    b, _ = take(TransactionGenerator(GeneratorConfig(seed=3), clock=lambda: 0.0), 100)
    assert a == b


def test_drift_changes_features_and_the_fraud_pattern() -> None:
    gen = TransactionGenerator(
        GeneratorConfig(drift_at=20_000, fraud_rate=0.05, label_delay=0), clock=lambda: 0.0
    )
    events, labels = take(gen, 40_000)
    fraud = {label["event_id"] for label in labels if label["is_fraud"]}
    before, after = events[:20_000], events[20_000:]
    assert mean(e["amount"] for e in after) > 1.5 * mean(e["amount"] for e in before)
    assert mean(e["card_present"] for e in after) < mean(e["card_present"] for e in before) - 0.25

    def share(evs: list[dict], categories: tuple[str, ...]) -> float:
        f = [e for e in evs if e["event_id"] in fraud]
        return sum(e["category"] in categories for e in f) / len(f)

    risky, tested = ("electronics", "gift_cards", "jewelry"), ("pharmacy", "fuel")
    assert share(before, risky) > 0.6 and share(after, risky) < 0.1
    assert share(after, tested) > 0.7

    def fraud_amount_ratio(evs: list[dict]) -> float:
        f = [e["amount"] for e in evs if e["event_id"] in fraud]
        ok = [e["amount"] for e in evs if e["event_id"] not in fraud]
        return mean(f) / mean(ok)

    # fraud was large for its card before the drift, and is small after it
    assert fraud_amount_ratio(before) > 2.0 and fraud_amount_ratio(after) < 0.5


def test_a_fresh_learner_learns_the_new_concept_faster_than_the_old_one_unlearns() -> None:
    result = check(CheckConfig(events=5000, warmup=1000, drift_fraction=0.5, refresh_after=300, window=500))
    assert result["pre_drift_auc"] > 0.9
    old, fresh = result["after_refresh_auc"]["old"], result["after_refresh_auc"]["fresh"]
    assert fresh > 0.9 and fresh > old + 0.15, result
