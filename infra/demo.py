"""``tide demo``: the whole loop on the embedded stack, driven by synthetic card traffic, with a report.

It starts a private broker and Redis, runs the feature processor, trainer, drift scorer and scoring
service as real processes, then for each generated transaction asks the scoring endpoint for a fraud
score (as a payment system would at authorisation), produces the event, and produces its label later.
Drift is injected part-way. At the end it reads the topics back and writes ``report.json`` and a plot.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from features.definitions import CARD_ACTIVITY
from features.store import entity_key
from infra.embedded import EmbeddedStack, StackInfo, free_port
from infra.errors import StackError
from infra.processes import Services, wait_until
from infra.report import build_report, write_plot
from infra.settings import CommonSettings
from online_training.model import REQUEST_FIELDS
from streams.generator import GeneratorConfig, TransactionGenerator
from streams.produce import EventProducer
from streams.topics import ensure_topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    duration_s: float = 90.0
    rate: float = 300.0  # events per second
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


@dataclass
class Traffic:
    """What the driver did and saw."""

    seq_of: dict[str, int] = field(default_factory=dict)  # event id -> record index
    sent_at: list[float] = field(default_factory=list)  # wall time each event was produced
    events: list[dict[str, Any]] = field(default_factory=list)  # scored events, in order
    warmup: list[dict[str, Any]] = field(default_factory=list)  # produced before scoring began
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    versions_seen: list[tuple[int, int]] = field(default_factory=list)  # (seq, version)
    freshness_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    labels: int = 0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class DemoContext:
    """Handed to an inspection hook while everything still runs (the end-to-end test uses it)."""

    settings: CommonSettings
    stack: StackInfo
    traffic: Traffic
    serve_url: str


async def _score(client: httpx.AsyncClient, url: str, event: dict[str, Any], traffic: Traffic) -> None:
    body = {
        "entity": event["card_id"],
        "event_id": event["event_id"],
        "features": {k: event[k] for k in REQUEST_FIELDS},
    }
    started = time.perf_counter()
    try:
        resp = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        traffic.statuses[0] = traffic.statuses.get(0, 0) + 1
        traffic.errors.append(f"{type(exc).__name__}: {exc}")
        return
    traffic.latencies_ms.append((time.perf_counter() - started) * 1000)
    traffic.statuses[resp.status_code] = traffic.statuses.get(resp.status_code, 0) + 1
    if resp.status_code == 200:
        traffic.versions_seen.append((int(event["seq"]), int(resp.json()["version"])))
    elif len(traffic.errors) < 20:
        traffic.errors.append(f"{resp.status_code}: {resp.text[:200]}")


class FreshnessProbe:
    """Measures event time to visible in the store for sampled events, polling them all in one pipeline."""

    def __init__(self, r: aioredis.Redis, namespace: str, traffic: Traffic, timeout_s: float = 5.0) -> None:
        self._r, self._ns, self._traffic, self._timeout = r, namespace, traffic, timeout_s
        self._pending: list[tuple[str, int]] = []  # (store key, event time)
        self.running = True

    def watch(self, entity: str, event_ts: int) -> None:
        self._pending.append((entity_key(CARD_ACTIVITY, entity, self._ns), event_ts))

    async def run(self) -> None:
        while self.running or self._pending:
            if self._pending:
                pending, self._pending = self._pending, []
                async with self._r.pipeline(transaction=False) as pipe:
                    for key, _ in pending:
                        pipe.hget(key, "ts")
                    newest = await pipe.execute()
                now_ms = time.time() * 1000
                for (key, ts), seen in zip(pending, newest, strict=True):
                    if seen is not None and int(float(seen)) >= ts:
                        self._traffic.freshness_ms.append(now_ms - ts)
                    elif now_ms - ts < self._timeout * 1000:
                        self._pending.append((key, ts))
                    else:
                        self._traffic.errors.append(f"freshness probe timed out for {key}")
            await asyncio.sleep(0.002)


async def drive(cfg: DemoConfig, settings: CommonSettings, serve_url: str) -> Traffic:
    """Warm the feature store up, then send ``cfg.events`` transactions at ``cfg.rate``: score each one,
    produce it, and produce the labels that have come due."""
    traffic = Traffic()
    gen = TransactionGenerator(
        GeneratorConfig(drift_at=cfg.warmup_events + cfg.drift_at, label_delay=cfg.label_delay, seed=cfg.seed)
    )
    producer = EventProducer(settings)
    # Warm-up: card history exists before scoring starts, as it would in a running system (these events
    # are not scored, so their labels are not sent).
    for _ in range(cfg.warmup_events):
        event, _ = gen.next()
        traffic.warmup.append(event)
        producer.send_event(event)
    producer.flush()
    warmup = {e["event_id"] for e in traffic.warmup}
    r = aioredis.Redis.from_url(settings.redis_url)
    probe = FreshnessProbe(r, settings.topic_prefix, traffic)
    probing = asyncio.create_task(probe.run())
    slots = asyncio.Semaphore(cfg.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    url = f"{serve_url}/v1/models/{settings.model_name}/score"

    async def scored(event: dict[str, Any]) -> None:
        try:
            await _score(client, url, event, traffic)
        finally:
            slots.release()

    def send_labels(labels: list[dict[str, Any]]) -> None:
        for label in labels:
            if label["event_id"] not in warmup:
                producer.send_label(label)
                traffic.labels += 1

    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        started = time.perf_counter()
        for i in range(cfg.events):
            lag = started + i / cfg.rate - time.perf_counter()
            if lag > 0:
                await asyncio.sleep(lag)
            event, labels = gen.next()
            traffic.seq_of[str(event["event_id"])] = i
            traffic.events.append(event)
            await slots.acquire()
            task = asyncio.create_task(scored(event))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            producer.send_event(event)
            traffic.sent_at.append(time.time())
            if i % cfg.probe_every == 0:
                probe.watch(str(event["card_id"]), int(event["ts"]))  # type: ignore[call-overload]
            send_labels(labels)
        await asyncio.gather(*tasks)
        send_labels(gen.drain())
        producer.flush()
        traffic.elapsed_s = time.perf_counter() - started
    probe.running = False
    await probing
    await r.aclose()
    return traffic


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
        settings = CommonSettings(
            kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url, state_dir=cfg.out_dir / "stack"
        )
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
            traffic = asyncio.run(drive(cfg, settings, serve_url))
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


def seq_at(traffic: Traffic, wall_ms: int) -> int:
    """The index of the last event produced at or before ``wall_ms``."""
    return max(bisect.bisect_right(traffic.sent_at, wall_ms / 1000) - 1, 0)
