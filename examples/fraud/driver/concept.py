"""Offline check that the injected concept is one a refreshed learner can learn.

``python -m examples.fraud.driver.concept`` plays the demo's stream (the same generator, warm-up, label
delay and drift point) through the fraud model's learner, progressively as the trainer does (predict at
the event, learn when its label arrives), twice from the change on:

- ``old``: the learner that has learnt the whole stream goes on learning;
- ``fresh``: ``refresh_after`` events after the change a new learner is warmed on the newest ``window``
  labels, then goes on learning (what ``Retrain(on=("concept", ...))`` does for an online learner).

``blessing_window`` gives the ROC AUC of both on that window, prequential on both sides (each
prediction made before learning the label), as the trainer compares a refresh with its champion.

It prints the ROC AUC of each over consecutive chunks of the post-drift stream, and over everything
after the refresh. The card features are computed exactly as the demo's views do for a run shorter than
an hour (every earlier transaction of the card is in the window).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .generator import GeneratorConfig, TransactionGenerator

PROJECT = Path(__file__).resolve().parents[1]


def new_model() -> Any:
    """The model's learner, from the project's ``fraud_model`` module (as the trainer imports it)."""
    spec = importlib.util.spec_from_file_location("_fraud_model", PROJECT / "fraud_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.new_model()


def roc_auc(labels: list[bool], scores: list[float]) -> float | None:
    """ROC AUC by average ranks (ties shared); None while one class is absent."""
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return None
    s = np.asarray(scores, dtype=float)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2)[inverse]  # average rank of each tie group, from 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


@dataclass(frozen=True)
class CheckConfig:
    events: int = 18_000  # scored events (the demo: 90 s at 200/s)
    warmup: int = 3000
    drift_fraction: float = 0.6
    label_delay: int = 200
    refresh_after: int = 600  # events after the change (an alert's delay)
    window: int = 1000  # labels the fresh learner is warmed on
    chunk: int = 500  # events per AUC point
    seed: int = 7


class Cards:
    """Each card's amounts so far: the demo's card features for a run shorter than their windows."""

    def __init__(self) -> None:
        self.amounts: dict[str, list[float]] = defaultdict(list)

    def features(self, event: dict[str, Any]) -> dict[str, Any]:
        a = self.amounts[event["card_id"]]
        n = len(a)
        x = {k: event[k] for k in ("amount", "category", "country", "card_present")}
        x.update(
            txn_count_1h=n,
            amount_sum_1h=sum(a),
            amount_mean_1h=sum(a) / n if n else None,
            amount_max_1h=max(a) if a else None,
            amount_std_1h=statistics.pstdev(a) if n > 1 else 0.0,
            txn_count_today=n,
            txn_count_lifetime=n,
        )
        return x

    def add(self, event: dict[str, Any]) -> None:
        self.amounts[event["card_id"]].append(event["amount"])


def _auc(rows: list[tuple[int, bool, float]]) -> float | None:
    value = roc_auc([r[1] for r in rows], [r[2] for r in rows])
    return None if value is None else round(value, 4)


def check(cfg: CheckConfig, factory: Callable[[], Any] = new_model) -> dict[str, Any]:
    drift_at = int(cfg.events * cfg.drift_fraction)
    refresh_at = drift_at + cfg.refresh_after
    gen = TransactionGenerator(
        GeneratorConfig(drift_at=cfg.warmup + drift_at, label_delay=cfg.label_delay, seed=cfg.seed),
        clock=lambda: 0.0,
    )
    cards = Cards()
    for _ in range(cfg.warmup):
        cards.add(gen.next()[0])
    old, fresh = factory(), None
    waiting: dict[str, tuple[int, dict[str, Any], float, float]] = {}
    recent: deque[tuple[dict[str, Any], bool, float]] = deque(maxlen=cfg.window)
    blessing: dict[str, float | None] = {}
    scored: dict[str, list[tuple[int, bool, float]]] = {"old": [], "fresh": []}
    for i in range(cfg.events):
        event, due = gen.next()
        x = cards.features(event)
        cards.add(event)
        p_old = old.predict_proba_one(x).get(True, 0.0)
        p_fresh = p_old if fresh is None else fresh.predict_proba_one(x).get(True, 0.0)
        waiting[event["event_id"]] = (i, x, p_old, p_fresh)
        for label in due:
            if label["event_id"] not in waiting:
                continue  # a warm-up event's label
            j, xj, po, pf = waiting.pop(label["event_id"])
            y = bool(label["is_fraud"])
            scored["old"].append((j, y, po))
            scored["fresh"].append((j, y, pf))
            old.learn_one(xj, y)
            if fresh is not None:
                fresh.learn_one(xj, y)
            recent.append((xj, y, po))
        if i == refresh_at:
            fresh = factory()
            warm: list[tuple[int, bool, float]] = []
            for xj, y, _ in recent:
                warm.append((0, y, fresh.predict_proba_one(xj).get(True, 0.0)))
                fresh.learn_one(xj, y)
            # Both sides prequential on the window, as the trainer blesses a refresh.
            blessing = {
                "candidate": _auc(warm),
                "champion": _auc([(0, y, po) for _, y, po in recent]),
                "post_drift_labels": sum(1 for r in scored["old"][-len(recent) :] if r[0] >= drift_at),
            }

    def chunks(rows: list[tuple[int, bool, float]]) -> list[float | None]:
        after = [r for r in rows if r[0] >= drift_at]
        return [_auc(after[k : k + cfg.chunk]) for k in range(0, len(after) - cfg.chunk + 1, cfg.chunk)]

    return {
        "config": cfg.__dict__,
        "pre_drift_auc": _auc([r for r in scored["old"] if drift_at - 5 * cfg.chunk <= r[0] < drift_at]),
        "post_drift_chunks": {name: chunks(rows) for name, rows in scored.items()},
        "blessing_window": blessing,
        "after_refresh_auc": {
            name: _auc([r for r in rows if r[0] >= refresh_at]) for name, rows in scored.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in CheckConfig().__dict__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args()
    print(json.dumps(check(CheckConfig(**vars(args))), indent=1))


if __name__ == "__main__":
    main()
