"""The food-delivery example's demo driver: ``tide demo --project examples/food_delivery``.

A delivery platform sped up: orders estimated over HTTP when placed (model ``eta``, with the restaurant
and the courier as its two entities), produced to ``orders``, their deliveries (the labels, and the
source of the restaurants' and couriers' history) produced 300 orders later. The convention is in
:mod:`tide.demo`'s docstring.

The driver's section compares the served estimates with the actual minutes, per model version, and
with a naive estimate (the mean of every delivery known when the order was placed); that naive MAE is
the baseline drawn beside the online MAE. The run is ok when, over the second half of the orders, the
served estimates beat the naive one.

Options (``DemoConfig.options``): ``warmup_orders`` (2000, produced with their deliveries, not scored),
``label_delay`` (300 orders), ``probe_every`` (10), ``slowdown_fraction`` (none: from this share of the
orders on, every ride is 1.5 times slower).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .traffic import MODEL, TrafficConfig, drive

if TYPE_CHECKING:
    from tide.demo import Demo


def run(demo: Demo) -> dict[str, Any]:
    slowdown = demo.option("slowdown_fraction", -1.0)
    cfg = TrafficConfig(
        orders=demo.events,
        rate=demo.rate,
        label_delay=demo.option("label_delay", 300),
        warmup_orders=demo.option("warmup_orders", 2000),
        concurrency=demo.concurrency,
        probe_every=demo.option("probe_every", 10),
        slowdown_at=int(demo.events * slowdown) if slowdown >= 0 else None,
        seed=demo.seed,
    )
    traffic = asyncio.run(drive(cfg, demo))
    section = traffic.summary()
    late = section["second_half"]
    section["baselines"] = {MODEL: section["naive_mae"]}
    section["ok"] = bool(
        section["non_2xx"] == 0
        and late["served_mae"] is not None
        and late["naive_mae"] is not None
        and late["served_mae"] < late["naive_mae"]
    )
    return section
