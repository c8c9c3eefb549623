"""Synthetic food-delivery traffic, used as a delivery app would use Tide: estimate each order's minutes
when it is placed (``POST /v1/models/eta/score`` with the restaurant and the courier), record the order
in ``orders``, and record the delivery in ``deliveries`` once the food is at the door.

It also keeps score the way the app's team would: each answer is compared with the actual minutes, and
with a naive estimate (the mean of every delivery known when the order was placed).

Only Tide's public surface is used: the scoring endpoint over HTTP and the demo handle (whose
``produce`` goes through ``tide.Client.produce``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from statistics import fmean
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import orjson

from .generator import GeneratorConfig, OrderGenerator

if TYPE_CHECKING:
    from tide.demo import Demo

MODEL = "eta"
ORDERS = "orders"
DELIVERIES = "deliveries"
PROBED_VIEW = "restaurant_kitchen"  # freshness: when an order shows in its restaurant's kitchen load
_JSON = {"content-type": "application/json"}


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


@dataclass(frozen=True)
class TrafficConfig:
    orders: int
    rate: float  # orders per second (0: as fast as the scoring endpoint answers)
    label_delay: int = 300  # a delivery is known this many orders after its order
    warmup_orders: int = 2000  # produced with their deliveries (not scored) first, so there is history
    concurrency: int = 32
    probe_every: int = 0  # one freshness probe per this many orders (0: none)
    slowdown_at: int | None = None  # index among the scored orders from which rides are slower
    seed: int = 11


@dataclass
class Traffic:
    """What the driver did and saw, as the delivery app."""

    orders: int = 0
    warmup: int = 0
    deliveries: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # order id -> (index, version answering, its estimate, the naive estimate then)
    answers: dict[str, tuple[int, int, float, float]] = field(default_factory=dict)
    actual: dict[str, float] = field(default_factory=dict)  # order id -> minutes
    elapsed_s: float = 0.0
    _known: list[float] = field(default_factory=lambda: [0.0, 0.0])  # sum and count of known minutes

    def delivered(self, minutes: float) -> None:
        self._known[0] += minutes
        self._known[1] += 1

    @property
    def naive(self) -> float:
        """The naive estimate: the mean of every delivery known so far."""
        return self._known[0] / self._known[1] if self._known[1] else 0.0

    def errors_by_version(self) -> list[dict[str, Any]]:
        by: dict[int, list[tuple[float, float]]] = {}
        for order_id, (_, version, est, naive) in self.answers.items():
            if order_id in self.actual:
                y = self.actual[order_id]
                by.setdefault(version, []).append((abs(est - y), abs(naive - y)))
        return [
            {
                "version": v,
                "orders": len(errs),
                "mae": round(fmean(e for e, _ in errs), 3),
                "naive_mae": round(fmean(b for _, b in errs), 3),
            }
            for v, errs in sorted(by.items())
        ]

    def mae(self, since: int = 0) -> tuple[float | None, float | None]:
        """MAE of the served estimates and of the naive one, over answered orders from index ``since``."""
        pairs = [
            (abs(est - self.actual[o]), abs(naive - self.actual[o]))
            for o, (i, _, est, naive) in self.answers.items()
            if i >= since and o in self.actual
        ]
        if not pairs:
            return None, None
        return round(fmean(e for e, _ in pairs), 3), round(fmean(b for _, b in pairs), 3)

    def summary(self) -> dict[str, Any]:
        served, naive = self.mae()
        late, late_naive = self.mae(since=self.orders // 2)
        return {
            "orders": self.orders,
            "warmup_orders": self.warmup,
            "deliveries": self.deliveries,
            "orders_per_s": round(self.orders / self.elapsed_s, 1) if self.elapsed_s else None,
            "requests": sum(self.statuses.values()),
            "non_2xx": sum(n for status, n in self.statuses.items() if not 200 <= status < 300),
            "client_latency_ms": percentiles(self.latencies_ms),
            "served_mae": served,
            "naive_mae": naive,
            "second_half": {"served_mae": late, "naive_mae": late_naive},
            "mae_by_version": self.errors_by_version(),
            "errors": self.errors[:20],
        }


def score_body(order: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Serving's request body: both entities the model reads features of, the order id its delivery
    joins on, and the request fields."""
    return {
        "entities": {"restaurant_id": order["restaurant_id"], "courier_id": order["courier_id"]},
        "event_id": order["order_id"],
        "features": {k: order[k] for k in fields},
    }


async def _score(
    client: aiohttp.ClientSession,
    url: str,
    index: int,
    order: dict[str, Any],
    body: dict[str, Any],
    traffic: Traffic,
) -> None:
    naive = traffic.naive
    started = time.perf_counter()
    try:
        async with client.post(url, data=orjson.dumps(body), headers=_JSON) as resp:
            payload = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        traffic.statuses[0] = traffic.statuses.get(0, 0) + 1
        traffic.errors.append(f"{type(exc).__name__}: {exc}")
        return
    traffic.latencies_ms.append((time.perf_counter() - started) * 1000)
    traffic.statuses[status] = traffic.statuses.get(status, 0) + 1
    if status == 200:
        answer = orjson.loads(payload)
        traffic.answers[order["order_id"]] = (index, int(answer["version"]), float(answer["score"]), naive)
    elif len(traffic.errors) < 20:
        traffic.errors.append(f"{status}: {payload[:200].decode(errors='replace')}")


async def drive(cfg: TrafficConfig, demo: Demo) -> Traffic:
    """Warm the history up, then place ``cfg.orders`` orders at ``cfg.rate``: estimate each one, produce
    it, and produce the deliveries that have come due."""
    traffic = Traffic()
    gen = OrderGenerator(
        GeneratorConfig(
            label_delay=cfg.label_delay,
            slowdown_at=None if cfg.slowdown_at is None else cfg.warmup_orders + cfg.slowdown_at,
            seed=cfg.seed,
        )
    )

    def send_deliveries(deliveries: list[dict[str, Any]]) -> None:
        for d in deliveries:
            demo.produce(DELIVERIES, d)
            traffic.actual[d["order_id"]] = d["minutes"]
            traffic.delivered(d["minutes"])
            traffic.deliveries += 1

    # Warm-up: the platform ran before this model did, so restaurants and couriers have history.
    restaurants: dict[str, int] = {}
    couriers: dict[str, int] = {}
    for _ in range(cfg.warmup_orders):
        order, due = gen.next()
        demo.produce(ORDERS, order)
        send_deliveries(due)
        for d in due:
            restaurants[d["restaurant_id"]] = couriers[d["courier_id"]] = d["ts"]
    traffic.warmup = cfg.warmup_orders
    demo.flush()
    await asyncio.to_thread(demo.wait_visible, "restaurant_history", restaurants)
    await asyncio.to_thread(demo.wait_visible, "courier_history", couriers)

    fields = tuple(demo.project.models[MODEL].request_fields)
    url = demo.scoring_url(MODEL)
    slots = asyncio.Semaphore(cfg.concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def scored(index: int, order: dict[str, Any]) -> None:
        try:
            await _score(client, url, index, order, score_body(order, fields), traffic)
        finally:
            slots.release()

    connector = aiohttp.TCPConnector(limit=cfg.concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10.0)
    ) as client:
        started = time.perf_counter()
        for i in range(cfg.orders):
            lag = started + i / cfg.rate - time.perf_counter() if cfg.rate > 0 else 0.0
            if lag > 0:
                await asyncio.sleep(lag)
            order, due = gen.next()
            await slots.acquire()
            task = asyncio.create_task(scored(i, order))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            demo.produce(ORDERS, order)
            traffic.orders += 1
            if cfg.probe_every and i % cfg.probe_every == 0:
                demo.watch_freshness(PROBED_VIEW, order["restaurant_id"], order["ts"])
            send_deliveries(due)
        await asyncio.gather(*tasks)
        send_deliveries(gen.drain())
        await asyncio.to_thread(demo.flush)
        traffic.elapsed_s = time.perf_counter() - started
    return traffic
