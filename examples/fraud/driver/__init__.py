"""The fraud example's demo driver: ``tide demo --project examples/fraud`` (the default project).

A payment system's day, sped up: card transactions scored over HTTP at authorisation, produced to the
``transactions`` source, their chargeback labels produced 200 events later; at 15 % of the stream an
operator deploys a canary of the model's first version (the judge decides it); drift (feature and
concept, :mod:`.generator`) injected at half the stream. The convention is in :mod:`tide.demo`'s
docstring.

Options (``DemoConfig.options``): ``warmup_events`` (3000: produced, not scored, so cards have history),
``label_delay`` (200 events), ``drift_fraction`` (0.5), ``probe_every`` (10: one freshness probe per
this many events), ``fraud_rate`` (0.03), ``canary_fraction`` (0.15; 0 or less: no canary),
``canary_version`` (``first``, ``previous`` or a number), ``canary_weight`` (0.2).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .traffic import TrafficConfig, drive

if TYPE_CHECKING:
    from tide.demo import Demo


def run(demo: Demo) -> dict[str, Any]:
    drift_fraction = demo.option("drift_fraction", 0.5)
    canary_fraction = demo.option("canary_fraction", 0.15)
    cfg = TrafficConfig(
        events=demo.events,
        rate=demo.rate,
        drift_at=int(demo.events * drift_fraction),
        label_delay=demo.option("label_delay", 200),
        warmup_events=demo.option("warmup_events", 3000),
        concurrency=demo.concurrency,
        probe_every=demo.option("probe_every", 10),
        fraud_rate=demo.option("fraud_rate", 0.03),
        seed=demo.seed,
        canary_at=int(demo.events * canary_fraction) if canary_fraction > 0 else None,
        canary_version=demo.option("canary_version", "first"),
        canary_weight=demo.option("canary_weight", 0.2),
    )
    traffic = asyncio.run(drive(cfg, demo))
    summary = traffic.summary()
    return {
        **summary,
        "warmup_events": cfg.warmup_events,
        "label_delay": cfg.label_delay,
        "drift_injected_at": cfg.drift_at,
        "ok": summary["non_2xx"] == 0,
    }
