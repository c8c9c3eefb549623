"""A synthetic food-delivery world: orders placed at restaurants, carried by couriers, and the actual
minutes each took, known once the food is at the door.

Minutes from order to door are the sum of parts the platform can learn:
- the restaurant's kitchen: a preparation time of its own (its cuisine sets the typical one), longer
  when the kitchen is busy (the log of its orders in the last minute) and for bigger orders;
- the ride: distance times the courier's pace (set by the vehicle, then by the courier's own habit);
- the time of day: lunch and dinner rushes are slower;
- noise (a few minutes: traffic lights, a stair climb).

A model that knows each restaurant's recent actual minutes and each courier's pace (both learnt from the
stream of deliveries) with the categorical context beats predicting the average by a wide margin.
From order ``slowdown_at`` on (optional), every ride takes ``slowdown`` times longer (rain).
"""

from __future__ import annotations

import itertools
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

CUISINES = ("pizza", "burger", "sushi", "curry", "salad", "noodles")
_PREP = {"pizza": 14.0, "burger": 9.0, "sushi": 17.0, "curry": 15.0, "salad": 6.0, "noodles": 11.0}
DAYPARTS = ("breakfast", "lunch", "afternoon", "dinner", "late")
_DAYPART_WEIGHTS = (8, 30, 12, 38, 12)
_DAYPART_MINUTES = {"breakfast": -1.0, "lunch": 3.0, "afternoon": 0.0, "dinner": 5.0, "late": 1.5}
VEHICLES = ("bike", "scooter", "car")
_VEHICLE_WEIGHTS = (45, 35, 20)
_PACE = {"bike": 4.0, "scooter": 2.6, "car": 3.2}  # ride minutes per km
KITCHEN_WINDOW_MS = 60_000
MINUTES_PER_ITEM = 0.8
KITCHEN_LOAD_MINUTES = 1.2  # per unit of log1p(orders in the last minute)


@dataclass(frozen=True)
class GeneratorConfig:
    restaurants: int = 300
    couriers: int = 400
    label_delay: int = 300  # a delivery is known this many orders after its order
    noise_minutes: float = 3.0
    slowdown_at: int | None = None
    slowdown: float = 1.5
    seed: int = 11


@dataclass(frozen=True)
class Restaurant:
    restaurant_id: str
    cuisine: str
    prep: float  # minutes


@dataclass(frozen=True)
class Courier:
    courier_id: str
    vehicle: str
    pace: float  # ride minutes per km


class OrderGenerator:
    """Yields ``(order, deliveries_due)`` pairs: an order and the deliveries that became known by then."""

    def __init__(self, config: GeneratorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng = random.Random(config.seed)
        self.restaurants = []
        for i in range(config.restaurants):
            cuisine = rng.choice(CUISINES)
            prep = max(_PREP[cuisine] + rng.gauss(0.0, 4.0), 3.0)
            self.restaurants.append(Restaurant(f"r-{i:04d}", cuisine, round(prep, 2)))
        self.couriers = []
        for i in range(config.couriers):
            vehicle = rng.choices(VEHICLES, _VEHICLE_WEIGHTS)[0]
            self.couriers.append(
                Courier(f"k-{i:04d}", vehicle, round(_PACE[vehicle] * rng.uniform(0.75, 1.35), 3))
            )
        # A few restaurants take most orders (a Zipf-like popularity).
        self._popularity = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(config.restaurants)))
        self._order = list(range(config.restaurants))
        rng.shuffle(self._order)
        self._kitchen: dict[str, deque[int]] = {}
        self._pending: deque[tuple[int, dict[str, Any]]] = deque()
        self.seq = 0

    def slowed(self, seq: int) -> bool:
        return self.config.slowdown_at is not None and seq >= self.config.slowdown_at

    def kitchen_load(self, restaurant_id: str, now_ms: int) -> int:
        """The restaurant's orders in the minute before ``now_ms`` (this order not counted)."""
        recent = self._kitchen.setdefault(restaurant_id, deque())
        while recent and recent[0] <= now_ms - KITCHEN_WINDOW_MS:
            recent.popleft()
        return len(recent)

    def _order_and_minutes(self, seq: int) -> tuple[dict[str, Any], dict[str, Any]]:
        rng, cfg = self._rng, self.config
        pick = rng.choices(self._order, cum_weights=self._popularity)[0]
        restaurant = self.restaurants[pick]
        courier = self.couriers[rng.randrange(len(self.couriers))]
        daypart = rng.choices(DAYPARTS, _DAYPART_WEIGHTS)[0]
        distance = min(max(math.exp(rng.gauss(0.8, 0.5)), 0.3), 12.0)
        items = rng.randint(1, 6)
        now_ms = int(self._clock() * 1000)
        load = self.kitchen_load(restaurant.restaurant_id, now_ms)
        self._kitchen[restaurant.restaurant_id].append(now_ms)
        pace = courier.pace * math.exp(rng.gauss(0.0, 0.08)) * (cfg.slowdown if self.slowed(seq) else 1.0)
        minutes = (
            restaurant.prep
            + KITCHEN_LOAD_MINUTES * math.log1p(load)
            + MINUTES_PER_ITEM * items
            + _DAYPART_MINUTES[daypart]
            + distance * pace
            + rng.gauss(0.0, cfg.noise_minutes)
        )
        order: dict[str, Any] = {
            "order_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "seq": seq,
            "restaurant_id": restaurant.restaurant_id,
            "courier_id": courier.courier_id,
            "cuisine": restaurant.cuisine,
            "daypart": daypart,
            "vehicle": courier.vehicle,
            "distance_km": round(distance, 3),
            "items": items,
            "ts": now_ms,
        }
        delivered: dict[str, Any] = {
            "order_id": order["order_id"],
            "restaurant_id": restaurant.restaurant_id,
            "courier_id": courier.courier_id,
            "minutes": round(max(minutes, 4.0), 2),
            "pace_min_per_km": round(pace, 3),
            "placed_ts": now_ms,
            "ts": now_ms,
        }
        return order, delivered

    def __iter__(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        while True:
            yield self.next()

    def next(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        order, delivered = self._order_and_minutes(self.seq)
        self._pending.append((self.seq, delivered))
        due: list[dict[str, Any]] = []
        while self._pending and self._pending[0][0] <= self.seq - self.config.label_delay:
            label = self._pending.popleft()[1]
            label["ts"] = order["ts"]
            due.append(label)
        self.seq += 1
        return order, due

    def drain(self) -> list[dict[str, Any]]:
        """The deliveries still pending (at the end of a finite run)."""
        now_ms = int(self._clock() * 1000)
        labels = [dict(label, ts=now_ms) for _, label in self._pending]
        self._pending.clear()
        return labels
