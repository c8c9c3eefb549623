"""A synthetic but realistic card-transaction stream with fraud labels that arrive later.

Each card has a home country and a typical spend; fraud is rare and looks different (risky merchant
categories, large amounts relative to the card's habit, card not present, foreign). From record
``drift_at`` on, two things change at once, as they do when a fraud ring moves or prices jump:
- feature drift: amounts rise and card-not-present purchases become common;
- concept drift: a ring testing stolen cards takes over: fraud moves to everyday categories (pharmacy,
  fuel) with small amounts, card present, at home. It is as learnable from the model's inputs as the
  old pattern (a fresh learner reaches the same ROC AUC within a few hundred labels) while the old
  learner scores it as the least suspicious traffic there is.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

CATEGORIES = ("grocery", "restaurant", "fuel", "travel", "electronics", "gift_cards", "jewelry", "pharmacy")
_EVERYDAY_WEIGHTS = (30, 22, 15, 8, 8, 3, 2, 12)
_RISKY = ("electronics", "gift_cards", "jewelry")
_TESTED = ("pharmacy", "fuel")  # where fraud moves after the drift
_COUNTRIES = ("US", "GB", "DE", "FR", "BR", "NG", "IN")


@dataclass(frozen=True)
class GeneratorConfig:
    cards: int = 2000
    fraud_rate: float = 0.03
    drift_at: int | None = None
    label_delay: int = 200  # a label is emitted this many events after its event
    seed: int = 7


@dataclass(frozen=True)
class _Card:
    card_id: str
    home: str
    typical: float


class TransactionGenerator:
    """Yields ``(event, labels_due)`` pairs: an event and the labels that became known by then."""

    def __init__(self, config: GeneratorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._rng = random.Random(config.seed)
        rng = self._rng
        self._cards = [
            _Card(
                f"card-{i:06d}",
                "US" if rng.random() < 0.85 else rng.choice(_COUNTRIES),
                math.exp(rng.gauss(3.4, 0.6)),
            )
            for i in range(config.cards)
        ]
        self._pending: deque[tuple[int, dict[str, Any]]] = deque()
        self.seq = 0

    def drifted(self, seq: int) -> bool:
        return self.config.drift_at is not None and seq >= self.config.drift_at

    def _event(self, seq: int) -> tuple[dict[str, Any], bool]:
        rng, drifted = self._rng, self.drifted(seq)
        card = self._cards[int(rng.paretovariate(1.2) * 7) % len(self._cards)]
        fraud = rng.random() < self.config.fraud_rate
        if fraud and not drifted:
            category = (
                rng.choice(_RISKY) if rng.random() < 0.75 else rng.choices(CATEGORIES, _EVERYDAY_WEIGHTS)[0]
            )
            amount = card.typical * rng.uniform(3.0, 12.0)
            present = rng.random() < 0.15
            country = rng.choice(_COUNTRIES) if rng.random() < 0.5 else card.home
        elif fraud:
            # A ring testing stolen cards at the till: small amounts in everyday categories, card present,
            # at home. As learnable from the model's inputs as the old pattern, and scored low by it.
            category = (
                rng.choice(_TESTED) if rng.random() < 0.8 else rng.choices(CATEGORIES, _EVERYDAY_WEIGHTS)[0]
            )
            amount = card.typical * rng.uniform(0.05, 0.3)
            present = rng.random() < 0.9
            country = card.home
        else:
            category = rng.choices(CATEGORIES, _EVERYDAY_WEIGHTS)[0]
            amount = card.typical * math.exp(rng.gauss(0.0, 0.5))
            present = rng.random() < (0.35 if drifted else 0.75)
            country = card.home if rng.random() < 0.96 else rng.choice(_COUNTRIES)
        if drifted:
            amount *= 2.2
        event: dict[str, Any] = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "seq": seq,
            "card_id": card.card_id,
            "merchant_id": f"m-{rng.randrange(5000):05d}",
            "category": category,
            "amount": round(amount, 2),
            "country": country,
            "card_present": present,
            "ts": int(self._clock() * 1000),
        }
        return event, fraud

    def __iter__(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        while True:
            yield self.next()

    def next(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        event, fraud = self._event(self.seq)
        now_ms = event["ts"]
        self._pending.append(
            (
                self.seq,
                {
                    "event_id": event["event_id"],
                    "card_id": event["card_id"],
                    "is_fraud": fraud,
                    "event_ts": event["ts"],
                    "ts": now_ms,
                },
            )
        )
        due: list[dict[str, Any]] = []
        while self._pending and self._pending[0][0] <= self.seq - self.config.label_delay:
            label = self._pending.popleft()[1]
            label["ts"] = now_ms
            due.append(label)
        self.seq += 1
        return event, due

    def drain(self) -> list[dict[str, Any]]:
        """The labels still pending (at the end of a finite run)."""
        now_ms = int(self._clock() * 1000)
        labels = [dict(label, ts=now_ms) for _, label in self._pending]
        self._pending.clear()
        return labels
