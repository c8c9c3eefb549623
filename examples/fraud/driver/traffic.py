"""A load driver: synthetic card transactions scored over HTTP and produced to Kafka, as a payment
system would use Tide (score at authorisation, record the event, learn the label later).

Used by ``tide produce --score-url`` against any deployment and by ``tide demo``.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson
import redis.asyncio as aioredis

from schemas.definitions import CARD_ACTIVITY
from features.store import entity_key, offsets_key
from infra.errors import StreamError
from infra.settings import CommonSettings
from examples.fraud.model import REQUEST_FIELDS
from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator
from streams.produce import EventProducer


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


_JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class TrafficConfig:
    events: int
    rate: float  # events per second (0: as fast as the scoring endpoint answers)
    drift_at: int | None = None  # index among the scored events
    label_delay: int = 200
    warmup_events: int = 0  # produced (not scored) first, so cards have history
    concurrency: int = 32  # scoring requests in flight
    probe_every: int = 0  # one freshness probe per this many events (0: none)
    seed: int = 7


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

    def summary(self) -> dict[str, Any]:
        """Events, labels and what the scoring endpoint answered, as the client saw it."""
        return {
            "events": len(self.events),
            "labels": self.labels,
            "events_per_s": round(len(self.events) / self.elapsed_s, 1) if self.elapsed_s else None,
            "requests": sum(self.statuses.values()),
            "non_2xx": sum(n for status, n in self.statuses.items() if not 200 <= status < 300),
            "latency_ms": percentiles(self.latencies_ms),
        }

    def seq_at(self, wall_ms: int) -> int:
        """The index of the last event produced at or before ``wall_ms``."""
        return max(bisect.bisect_right(self.sent_at, wall_ms / 1000) - 1, 0)


async def _score(
    client: aiohttp.ClientSession, url: str, index: int, event: dict[str, Any], traffic: Traffic
) -> None:
    body = {
        "entity": event["card_id"],
        "event_id": event["event_id"],
        "features": {k: event[k] for k in REQUEST_FIELDS},
    }
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
        traffic.versions_seen.append((index, int(orjson.loads(payload)["version"])))
    elif len(traffic.errors) < 20:
        traffic.errors.append(f"{status}: {payload[:200].decode(errors='replace')}")


async def _applied(r: aioredis.Redis, namespace: str, events: int, timeout_s: float = 60.0) -> None:
    """Wait until the feature processor has applied ``events`` records of a fresh events topic."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stored = await r.hgetall(offsets_key(CARD_ACTIVITY, namespace))
        # Positions only: the same hash holds each partition's watermark under "<partition>:wm".
        names = {bytes(n) if isinstance(n, bytes) else str(n).encode(): int(v) for n, v in stored.items()}
        if sum(pos + 1 for name, pos in names.items() if not name.endswith(b":wm")) >= events:
            return
        await asyncio.sleep(0.05)
    raise StreamError(f"the feature processor did not apply {events} warm-up events in {timeout_s:.0f} s")


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


async def drive(cfg: TrafficConfig, settings: CommonSettings, serve_url: str) -> Traffic:
    """Warm the feature store up, then send ``cfg.events`` transactions at ``cfg.rate``: score each one,
    produce it, and produce the labels that have come due."""
    traffic = Traffic()
    gen = TransactionGenerator(
        GeneratorConfig(
            drift_at=None if cfg.drift_at is None else cfg.warmup_events + cfg.drift_at,
            label_delay=cfg.label_delay,
            seed=cfg.seed,
        )
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
    if cfg.warmup_events:
        await _applied(r, settings.topic_prefix, cfg.warmup_events)
    probe = FreshnessProbe(r, settings.topic_prefix, traffic)
    probing = asyncio.create_task(probe.run())
    slots = asyncio.Semaphore(cfg.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    url = f"{serve_url}/v1/models/{settings.model_name}/score"

    async def scored(index: int, event: dict[str, Any]) -> None:
        try:
            await _score(client, url, index, event, traffic)
        finally:
            slots.release()

    def send_labels(labels: list[dict[str, Any]]) -> None:
        for label in labels:
            if label["event_id"] not in warmup:
                producer.send_label(label)
                traffic.labels += 1

    connector = aiohttp.TCPConnector(limit=cfg.concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10.0)
    ) as client:
        started = time.perf_counter()
        for i in range(cfg.events):
            lag = started + i / cfg.rate - time.perf_counter() if cfg.rate > 0 else 0.0
            if lag > 0:
                await asyncio.sleep(lag)
            event, labels = gen.next()
            traffic.seq_of[str(event["event_id"])] = i
            traffic.events.append(event)
            await slots.acquire()
            task = asyncio.create_task(scored(i, event))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            producer.send_event(event)
            traffic.sent_at.append(time.time())
            if cfg.probe_every and i % cfg.probe_every == 0:
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
