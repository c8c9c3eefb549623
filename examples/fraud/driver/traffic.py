"""Synthetic card traffic, used as a payment system would use Tide: score each transaction at
authorisation (``POST /v1/models/fraud/score``), record it in the ``transactions`` source, and record
its chargeback label in ``chargebacks`` when it becomes known.

Only Tide's public surface is used: the scoring endpoint over HTTP and the demo handle (whose
``produce`` goes through ``tide.Client.produce``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import orjson

from .generator import GeneratorConfig, TransactionGenerator

if TYPE_CHECKING:
    from tide.demo import Demo

MODEL = "fraud"
EVENTS = "transactions"
LABELS = "chargebacks"
PROBED_VIEW = "card_activity"  # freshness: when a transaction shows in its card's features
_JSON = {"content-type": "application/json"}


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


@dataclass(frozen=True)
class TrafficConfig:
    events: int
    rate: float  # events per second (0: as fast as the scoring endpoint answers)
    drift_at: int | None = None  # index among the scored events
    label_delay: int = 200
    warmup_events: int = 0  # produced (not scored) first, so cards have history
    concurrency: int = 32  # scoring requests in flight
    probe_every: int = 0  # one freshness probe per this many events (0: none)
    fraud_rate: float = 0.03
    seed: int = 7
    canary_at: int | None = None  # index among the scored events where a canary is deployed
    canary_version: str = "first"  # first or previous (blessed version), or a version number
    canary_weight: float = 0.2


@dataclass
class Traffic:
    """What the driver did and saw, as the payment system's client."""

    events: int = 0
    warmup: int = 0
    labels: int = 0
    frauds: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    versions_seen: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    canary: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "transactions": self.events,
            "warmup_transactions": self.warmup,
            "chargebacks": self.labels,
            "fraud_share": round(self.frauds / self.labels, 4) if self.labels else None,
            "transactions_per_s": round(self.events / self.elapsed_s, 1) if self.elapsed_s else None,
            "requests": sum(self.statuses.values()),
            "non_2xx": sum(n for status, n in self.statuses.items() if not 200 <= status < 300),
            "client_latency_ms": percentiles(self.latencies_ms),
            "versions_seen": sorted(self.versions_seen),
            "errors": self.errors[:20],
            **({"canary": self.canary} if self.canary is not None else {}),
        }


def pick_version(versions: list[dict[str, Any]], which: str) -> int | None:
    """The blessed version ``which`` names: ``first`` (the oldest), ``previous`` (the newest but one) or
    a version number."""
    if which.isdigit():
        return int(which)
    blessed = sorted(
        v["version"] for v in versions if v.get("blessing") is None or v["blessing"].get("blessed")
    )
    if which == "first":
        return blessed[0] if blessed else None
    if which == "previous":
        return blessed[-2] if len(blessed) >= 2 else None
    raise ValueError(f"canary_version: {which!r} is not first, previous or a version number")


def deploy_canary(demo: Demo, cfg: TrafficConfig, at: int) -> dict[str, Any]:
    """Deploy a canary of the version ``cfg.canary_version`` names, as an operator would over HTTP; what
    serving answered."""
    version = pick_version(demo.versions(MODEL), cfg.canary_version)
    if version is None:
        return {"model": MODEL, "version": None, "at_record": at, "status": None, "error": "no such version"}
    answer = demo.deploy(
        MODEL, "canary", version, cfg.canary_weight, reason=f"demo: canary of version {version}"
    )
    deployment = answer.get("deployment") or {}
    return {
        "model": MODEL,
        "version": version,
        "weight": cfg.canary_weight,
        "at_record": at,
        "status": answer["status"],
        "id": deployment.get("id"),
        "outcome": answer.get("outcome"),
        **({"error": answer} if answer["status"] != 202 else {}),
    }


def score_body(event: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Serving's request body: the card (the model's one entity), the event id labels join on, and
    the request fields."""
    return {
        "entity": event["card_id"],
        "event_id": event["event_id"],
        "features": {k: event[k] for k in fields},
    }


async def _score(client: aiohttp.ClientSession, url: str, body: dict[str, Any], traffic: Traffic) -> None:
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
        traffic.versions_seen.add(int(orjson.loads(payload)["version"]))
    elif len(traffic.errors) < 20:
        traffic.errors.append(f"{status}: {payload[:200].decode(errors='replace')}")


async def drive(cfg: TrafficConfig, demo: Demo) -> Traffic:
    """Warm the feature store up, then send ``cfg.events`` transactions at ``cfg.rate``: score each one,
    produce it, and produce the labels that have come due."""
    traffic = Traffic()
    gen = TransactionGenerator(
        GeneratorConfig(
            drift_at=None if cfg.drift_at is None else cfg.warmup_events + cfg.drift_at,
            label_delay=cfg.label_delay,
            fraud_rate=cfg.fraud_rate,
            seed=cfg.seed,
        )
    )
    # Warm-up: card history exists before scoring starts, as it would in a running system. These
    # transactions are not scored, so their labels are not sent.
    newest: dict[str, int] = {}
    warmup: set[str] = set()
    for _ in range(cfg.warmup_events):
        event, _ = gen.next()
        warmup.add(str(event["event_id"]))
        newest[str(event["card_id"])] = int(event["ts"])
        demo.produce(EVENTS, event)
    traffic.warmup = len(warmup)
    demo.flush()
    await asyncio.to_thread(demo.wait_visible, PROBED_VIEW, newest)

    fields = tuple(demo.project.models[MODEL].request_fields)
    url = demo.scoring_url(MODEL)
    slots = asyncio.Semaphore(cfg.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    canary: asyncio.Task[dict[str, Any]] | None = None

    def send_labels(labels: list[dict[str, Any]]) -> None:
        for label in labels:
            if label["event_id"] not in warmup:
                demo.produce(LABELS, label)
                traffic.labels += 1
                traffic.frauds += bool(label["is_fraud"])

    async def scored(body: dict[str, Any]) -> None:
        try:
            await _score(client, url, body, traffic)
        finally:
            slots.release()

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
            await slots.acquire()
            task = asyncio.create_task(scored(score_body(event, fields)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            demo.produce(EVENTS, event)  # recorded once authorised, as a payment system would
            traffic.events += 1
            if cfg.probe_every and i % cfg.probe_every == 0:
                demo.watch_freshness(PROBED_VIEW, str(event["card_id"]), int(event["ts"]))
            send_labels(labels)
            if i == cfg.canary_at:
                canary = asyncio.create_task(asyncio.to_thread(deploy_canary, demo, cfg, i))
        await asyncio.gather(*tasks)
        if canary is not None:
            try:
                traffic.canary = await canary
            except Exception as exc:  # reported, not raised: the run goes on and the report says why
                traffic.canary = {"model": MODEL, "status": None, "error": f"{type(exc).__name__}: {exc}"}
        send_labels(gen.drain())
        await asyncio.to_thread(demo.flush)
        traffic.elapsed_s = time.perf_counter() - started
    return traffic
