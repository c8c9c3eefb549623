"""``tide demo``: the whole loop on the embedded stack, driven by synthetic card traffic, with a report.

It starts a private broker and Redis, runs the feature processor, trainer, drift scorer and scoring
service as real processes, then for each generated transaction asks the scoring endpoint for a fraud
score (as a payment system would at authorisation), produces the event, and produces its label later.
Drift is injected part-way. At the end it reads the topics back and writes ``report.json`` and a plot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tide.embedded import EmbeddedStack, StackInfo, free_port
from infra.errors import StackError
from tide.processes import Services, wait_until
from tide.report import build_report, write_plot
from infra.settings import CommonSettings
from infra.topics import ensure_topics
from examples.fraud.driver.traffic import Traffic, TrafficConfig, drive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    duration_s: float = 90.0
    rate: float = 200.0  # events per second
    out_dir: Path = Path("out/demo")
    drift_fraction: float = 0.6  # drift starts at this share of the events
    label_delay: int = 200
    publish_every: int = 500  # labels per model version
    concurrency: int = 32  # scoring requests in flight
    probe_every: int = 10  # one freshness probe per this many events
    warmup_events: int = 3000  # produced (not scored) first, so cards have history
    seed: int = 7

    @property
    def events(self) -> int:
        return int(self.duration_s * self.rate)

    @property
    def drift_at(self) -> int:
        return int(self.events * self.drift_fraction)

    @property
    def traffic(self) -> TrafficConfig:
        return TrafficConfig(
            events=self.events,
            rate=self.rate,
            drift_at=self.drift_at,
            label_delay=self.label_delay,
            warmup_events=self.warmup_events,
            concurrency=self.concurrency,
            probe_every=self.probe_every,
            seed=self.seed,
        )


@dataclass(frozen=True)
class DemoContext:
    """Handed to an inspection hook while everything still runs (the end-to-end test uses it)."""

    settings: CommonSettings
    stack: StackInfo
    traffic: Traffic
    serve_url: str


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def run_demo(cfg: DemoConfig, inspect: Callable[[DemoContext], None] | None = None) -> dict[str, Any]:
    """Run the loop, write ``report.json`` and the plot into ``cfg.out_dir``, return the report."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would cost the driver
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    serve_url = f"http://127.0.0.1:{port}"
    with EmbeddedStack(cfg.out_dir / "stack") as stack:
        settings = stack.settings(state_dir=cfg.out_dir / "stack")
        ensure_topics(settings)
        services = Services(
            {
                "TIDE_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
                "TIDE_REDIS_URL": stack.redis_url,
                "TIDE_STATE_DIR": str(cfg.out_dir / "stack"),
                "TIDE_SERVE_PORT": str(port),
                "TIDE_TRAINER_PUBLISH_EVERY": str(cfg.publish_every),
                "TIDE_LOG_LEVEL": "INFO",
            },
            cfg.out_dir / "logs",
        )
        try:
            for name in ("features", "train", "drift", "serve"):
                services.start(name, name)
            if not wait_until(lambda: _ready(serve_url) or bool(services.check_alive()), 60):
                raise StackError("scoring service not ready in 60 s:\n" + services.log_tail("serve"))
            if dead := services.check_alive():
                raise StackError(f"{dead} exited:\n" + "\n".join(services.log_tail(d) for d in dead))
            log.info(
                "loop ready; sending %d events at %.0f/s, drift at %d", cfg.events, cfg.rate, cfg.drift_at
            )
            traffic = asyncio.run(drive(cfg.traffic, settings, serve_url))
            time.sleep(3.0)  # let the processors finish the tail of the stream
            metrics_text = httpx.get(f"{serve_url}/metrics", timeout=5.0).text
            if inspect is not None:
                inspect(DemoContext(settings, stack, traffic, serve_url))
            report = build_report(cfg, settings, traffic, metrics_text)
            dead = services.check_alive()
            report["services_exited"] = dead
            report["ok"] = report["ok"] and not dead
        finally:
            services.stop_all()
    write_plot(report, cfg.out_dir / "loop.png")
    (cfg.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
