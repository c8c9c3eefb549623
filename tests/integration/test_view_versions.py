"""Versioned views against the real broker and Redis: a breaking change backfilled to the values a fresh
processor computes while the old version keeps serving, retirement once models moved, a view added to
a running processor, exactly-once per key under concurrent writers, and one hash slot per script call."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import redis

from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator
from features import tiles
from features.folder import FeatureFolder, plan_sources, split_messages
from features.store import (
    FeatureRow,
    RedisOnlineStore,
    RedisWriter,
    ViewBatch,
    entity_key,
    slot_of,
)
from features.versions import ViewState, read_states, serving_version
from infra.deadletter import MemoryDeadLetters
from infra.kafka import make_producer, read_to_end
from infra.settings import CommonSettings
from infra.topics import prefixed, topic
from schemas import codec
from schemas.definitions import Entity, Feature, FeatureView, Project
from schemas.registry import latest
from tide.plan import apply
from tide.processes import Services, wait_until

pytestmark = pytest.mark.integration

EVENTS = "events"


def produce(settings: CommonSettings, records: Iterable[dict[str, Any]]) -> None:
    producer = make_producer(settings)
    for record in records:
        producer.produce(
            prefixed(settings, EVENTS),
            key=str(record["card_id"]).encode(),
            value=codec.encode("transactions", record),
        )
    assert producer.flush(30) == 0


def generate(gen: TransactionGenerator, n: int) -> list[dict[str, Any]]:
    return [gen.next()[0] for _ in range(n)]


def read(
    settings: CommonSettings, pairs: Sequence[tuple[FeatureView, str]], now: int, namespace: str | None = None
) -> list[FeatureRow]:
    async def go() -> list[FeatureRow]:
        ns = settings.topic_prefix if namespace is None else namespace
        store = RedisOnlineStore.from_url(settings.redis_url, ns)
        try:
            return await store.read_pairs(pairs, now)
        finally:
            await store.close()

    return asyncio.run(go())


def total(settings: CommonSettings, view: FeatureView, feature: str, entities: Sequence[str]) -> float:
    rows = read(settings, [(view, e) for e in entities], int(time.time() * 1000))
    return sum(r.values[feature] for r in rows)


def states(settings: CommonSettings) -> dict[str, str]:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return {ref: s.state for ref, s in read_states(client, settings.topic_prefix).items()}
    finally:
        client.close()


def read_states_of(settings: CommonSettings) -> dict[str, ViewState]:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return read_states(client, settings.topic_prefix)
    finally:
        client.close()


def fresh_fold(settings: CommonSettings, views: Sequence[FeatureView], namespace: str) -> None:
    """What a processor started from scratch with only ``views`` writes under ``namespace``: every record
    of the source topic, in partition order, folded and applied in batches through the processor's code."""
    plans = plan_sources(settings, views)
    (plan,) = plans.values()
    writer = RedisWriter.from_url(settings.redis_url, namespace)
    folder = FeatureFolder(writer, MemoryDeadLetters())
    msgs = list(read_to_end(settings, plan.topic, plan.source.partitions))
    try:
        for at in range(0, len(msgs), 300):
            batches = split_messages(plans, msgs[at : at + 300], MemoryDeadLetters(), int(time.time() * 1000))
            folder.apply([p for b in batches for p in folder.plan(b, b.views)])
    finally:
        writer.close()


def assert_rows_equal(a: Sequence[FeatureRow], b: Sequence[FeatureRow]) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.entity, x.status, x.newest_event_ms) == (y.entity, y.status, y.newest_event_ms)
        for name, value in x.values.items():
            other = y.values[name]
            if isinstance(value, float):
                assert math.isclose(value, other, rel_tol=1e-9, abs_tol=1e-9), (x.entity, name)
            else:
                assert value == other, (x.entity, name)


def publish_model_version(settings: CommonSettings, model: str, version: int, views: dict[str, int]) -> None:
    record = {
        "model": model,
        "version": version,
        "flavor": "river",
        "artifact": b"",
        "sha256": "0" * 64,
        "feature_names": [],
        "metric_name": "ROCAUC",
        "trained_on": 0,
        "created_ts": int(time.time() * 1000),
        "view_versions": views,
    }
    producer = make_producer(settings)
    producer.produce(
        topic(settings, "models"), key=model.encode(), value=codec.encode("model_version", record)
    )
    assert producer.flush(10) == 0


def test_a_breaking_window_change_is_backfilled_to_what_a_fresh_processor_computes_then_retired(
    fraud: CommonSettings, fraud_project: Project, services: Services
) -> None:
    gen = TransactionGenerator(GeneratorConfig(cards=120, seed=31))
    events = generate(gen, 3000)
    produce(fraud, events)
    services.start("features", "features")
    cards = sorted({e["card_id"] for e in events})
    v1 = fraud_project.views["card_activity"]
    assert wait_until(lambda: total(fraud, v1, "txn_count_1h", cards) >= len(events) - 20, 60)
    assert wait_until(lambda: states(fraud).get("card_activity@1") == "live", 10)

    # the window changes: a breaking change, so version 2 with its own keys, backfilled from the topic
    applied_ms = int(time.time() * 1000)
    assert serving_version(fraud_project, read_states_of(fraud), "card_activity") == v1
    changed = dataclasses.replace(v1, window="2h")
    apply(
        fraud,
        Project.of(
            "fraud",
            [
                changed,
                *[v for v in fraud_project.views.values() if v.name != v1.name],
                *fraud_project.models.values(),
            ],
        ),
        allow_breaking=True,
    )
    registered = latest(fraud)
    assert registered is not None
    project = registered.project
    v2 = project.views["card_activity"]
    assert v2.version == 2 and "card_activity@1" in project.previous_views
    more = generate(gen, 1000)  # traffic goes on meanwhile
    produce(fraud, more)
    events += more
    seen_states = set()

    def v2_live() -> bool:
        now = states(fraud)
        seen_states.add(now.get("card_activity@2"))
        return now.get("card_activity@2") == "live"

    assert wait_until(v2_live, 60, interval=0.02)
    client = redis.Redis.from_url(fraud.redis_url)
    raw = read_states(client, fraud.topic_prefix)
    # live only once every partition caught up with the live position
    progress = raw["card_activity@2"].progress
    assert len(progress) == fraud_project.sources["transactions"].partitions
    assert all(position >= target for position, target in progress.values()), progress
    assert raw["card_activity@2"].ts >= applied_ms
    assert serving_version(project, raw, "card_activity") == v2

    def both_done() -> bool:  # v1 still served; a few generated events are late for both (same lateness)
        a, b = total(fraud, v1, "txn_count_1h", cards), total(fraud, v2, "txn_count_1h", cards)
        return a == b >= len(events) - 20

    assert wait_until(both_done, 30)
    time.sleep(1.0)

    # v2 holds what a processor computing v2 from the start holds; v1 all its events too
    fresh_fold(fraud, [v2], f"{fraud.topic_prefix}fresh.")
    now = int(time.time() * 1000)
    pairs = [(v2, c) for c in cards]
    backfilled, fresh = read(fraud, pairs, now), read(fraud, pairs, now, f"{fraud.topic_prefix}fresh.")
    assert_rows_equal(backfilled, fresh)
    counted = sum(r.values["txn_count_1h"] for r in backfilled)
    assert counted == sum(r.values["txn_count_1h"] for r in read(fraud, [(v1, c) for c in cards], now))
    assert client.exists(entity_key(v1, cards[0], fraud.topic_prefix))

    # retirement: once every model reading the view published a version on v2, v1's keys expire
    assert states(fraud)["card_activity@1"] == "live"
    publish_model_version(fraud, "fraud", 1, {"card_activity": 2, "card_daily": 1, "card_profile": 1})
    time.sleep(2.0)
    assert states(fraud)["card_activity@1"] == "live"  # fraud_nn still reads v1
    publish_model_version(fraud, "fraud_nn", 1, {"card_activity": 2})
    assert wait_until(lambda: states(fraud)["card_activity@1"] == "retired", 20)
    assert wait_until(lambda: not client.exists(entity_key(v1, cards[0], fraud.topic_prefix)), 10)
    assert not list(client.scan_iter(match=f"{fraud.topic_prefix}tide:f:*card_activity@1", count=1000))
    assert client.exists(entity_key(v2, cards[0], fraud.topic_prefix))
    client.close()
    assert not services.check_alive()


def test_a_view_added_to_a_running_processor_is_computed_from_history_within_seconds(
    fraud: CommonSettings, fraud_project: Project, services: Services
) -> None:
    gen = TransactionGenerator(GeneratorConfig(cards=80, seed=41))
    events = generate(gen, 2000)
    produce(fraud, events)
    services.start("features", "features")
    cards = sorted({e["card_id"] for e in events})
    profile = fraud_project.views["card_profile"]
    assert wait_until(lambda: total(fraud, profile, "txn_count_lifetime", cards) >= len(events), 60)

    merchant = FeatureView(
        name="merchant_activity",
        source=fraud_project.sources["transactions"],
        entity=Entity("merchant", "merchant_id"),
        kind="lifetime",
        allowed_lateness="1h",
        features=[Feature("merchant_txn", "count"), Feature("merchant_amount", "sum", "amount")],
    )
    project = Project.of("fraud", [*fraud_project.views.values(), merchant, *fraud_project.models.values()])
    added = time.monotonic()
    apply(fraud, project)
    registered = latest(fraud)
    assert registered is not None
    merchant = registered.project.views["merchant_activity"]  # the version the registry gave it
    merchants = sorted({e["merchant_id"] for e in events})
    assert wait_until(lambda: total(fraud, merchant, "merchant_txn", merchants) >= len(events), 30)
    took = time.monotonic() - added
    assert took < 15, took
    assert wait_until(lambda: states(fraud).get(merchant.ref) == "live", 10)
    time.sleep(1.0)
    now = int(time.time() * 1000)
    rows = read(fraud, [(merchant, m) for m in merchants], now)
    want: dict[str, list[float]] = {}
    for e in events:
        want.setdefault(e["merchant_id"], []).append(float(e["amount"]))
    for row in rows:
        assert row.values["merchant_txn"] == len(want[row.entity])
        assert row.values["merchant_amount"] == pytest.approx(sum(want[row.entity]), rel=1e-9)
    later = generate(gen, 300)  # and it is folded live from then on
    produce(fraud, later)
    assert wait_until(
        lambda: (
            total(fraud, merchant, "merchant_txn", merchants)
            >= len(events) + sum(e["merchant_id"] in set(merchants) for e in later)
        ),
        30,
    )
    assert not services.check_alive()


# --- the store itself ------------------------------------------------------------------------------------


def _records(n: int, seed: int) -> list[tuple[int, dict[str, Any]]]:
    gen = TransactionGenerator(GeneratorConfig(cards=40, seed=seed))
    return [(i, e) for i, e in enumerate(generate(gen, n))]


def _apply_in_batches(
    url: str,
    namespace: str,
    views: Sequence[FeatureView],
    records: Sequence[tuple[int, dict[str, Any]]],
    size: int,
) -> int:
    """One writer of partition ``p:0``, in batches of ``size``, from its own idea of the positions
    (none: as if it had just been assigned the partition); returns the conflicts it met."""
    from features.folder import PartitionBatch, SourceRecord

    writer = RedisWriter.from_url(url, namespace)
    folder = FeatureFolder(writer, MemoryDeadLetters())
    conflicts = 0
    real_apply = writer.apply

    def counting(batches: Sequence[ViewBatch]) -> Any:
        nonlocal conflicts
        found = real_apply(batches)
        conflicts += len(found)
        return found

    writer.apply = counting  # type: ignore[method-assign]
    for at in range(0, len(records), size):
        chunk = records[at : at + size]
        b = PartitionBatch(
            "p", 0, list(views), [SourceRecord(o, e, None, b"") for o, e in chunk], chunk[-1][0]
        )
        folder.apply(folder.plan(b, views))
    writer.close()
    return conflicts


def test_concurrent_writers_of_one_partition_count_every_event_once_per_key(
    settings: CommonSettings, fraud_project: Project
) -> None:
    views = [v for v in fraud_project.views.values() if v.source_name == "transactions"]
    records = _records(3000, seed=7)
    ns = f"{settings.topic_prefix}kx."
    # two writers that both think they own the partition, with different batch boundaries, at once,
    # over the first 2000 records
    found: list[int] = []
    threads = [
        threading.Thread(
            target=lambda s=s: found.append(
                _apply_in_batches(settings.redis_url, ns, views, records[:2000], s)
            )
        )
        for s in (170, 230)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # then a third over all of them that restarts from nothing (positions lost, as after a crash before
    # they moved): keys applied part-way through its batches are refolded from their own positions
    client = redis.Redis.from_url(settings.redis_url)
    for view in views:
        client.delete(f"{ns}tide:pos:{view.ref}")
    redone = _apply_in_batches(settings.redis_url, ns, views, records, 310)
    assert redone > 0
    cards = sorted({str(e["card_id"]) for _, e in records})
    now = max(int(e["ts"]) for _, e in records)
    rows = read(settings, [(fraud_project.views["card_profile"], c) for c in cards], now, ns)
    assert sum(r.values["txn_count_lifetime"] for r in rows) == len(records)
    want = {c: sum(1 for _, e in records if e["card_id"] == c) for c in cards}
    assert {r.entity: r.values["txn_count_lifetime"] for r in rows} == want
    one = read(settings, [(fraud_project.views["card_activity"], c) for c in cards], now, ns)
    fresh_ns = f"{settings.topic_prefix}ky."
    _apply_in_batches(settings.redis_url, fresh_ns, views, records, 500)
    other = read(settings, [(fraud_project.views["card_activity"], c) for c in cards], now, fresh_ns)
    assert_rows_equal(one, other)
    client.close()


class Recorder:
    """Wraps a registered script: records the KEYS of every call."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.calls: list[list[str]] = []

    def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        self.calls.append(list(keys))
        return self.script(keys=keys, args=args, client=client)


def test_every_script_call_touches_one_hash_slot_in_cluster_mode(
    settings: CommonSettings, fraud_project: Project
) -> None:
    views = [v for v in fraud_project.views.values() if v.source_name == "transactions"]
    v2 = dataclasses.replace(views[0], window="2h", version=2)
    views.append(v2)
    records = _records(800, seed=3)
    single_ns, cluster_ns = f"{settings.topic_prefix}one.", f"{settings.topic_prefix}many."
    folded = tiles.fold_partition(views, records, tiles.NO_WATERMARK)
    batches = [ViewBatch(v, "p:0", folded.deltas[v.ref], records[-1][0], folded.watermark) for v in views]

    single = RedisWriter.from_url(settings.redis_url, single_ns)
    cluster = RedisWriter.from_url(settings.redis_url, cluster_ns, cluster=True)
    recorder = cluster._apply = Recorder(cluster._apply)  # type: ignore[assignment]
    assert single.apply(batches) == [] and cluster.apply(batches) == []
    assert len(recorder.calls) > 10  # one per slot of the entities' keys, then one per positions hash
    for keys in recorder.calls:
        assert len({slot_of(k) for k in keys}) == 1, keys
    # an entity's keys of every view and version share its slot
    card = str(records[0][1]["card_id"])
    assert len({slot_of(entity_key(v, card, cluster_ns)) for v in views}) == 1
    # the same contents either way, positions included
    client = redis.Redis.from_url(settings.redis_url)
    for ns_a, ns_b in ((single_ns, cluster_ns),):
        keys_a = sorted(k.decode()[len(ns_a) :] for k in client.scan_iter(match=f"{ns_a}tide:*", count=1000))
        keys_b = sorted(k.decode()[len(ns_b) :] for k in client.scan_iter(match=f"{ns_b}tide:*", count=1000))
        assert keys_a == keys_b and len(keys_a) > 100
        for key in keys_a:
            assert client.hgetall(ns_a + key) == client.hgetall(ns_b + key), key
    assert single.positions(views, "p:0") == [(records[-1][0], folded.watermark)] * len(views)

    # reads: one call per slot in cluster mode, each of one slot; the same rows as a single call
    async def both() -> tuple[list[FeatureRow], list[FeatureRow], list[list[str]]]:
        a = RedisOnlineStore.from_url(settings.redis_url, single_ns)
        b = RedisOnlineStore(redis.asyncio.Redis.from_url(settings.redis_url), cluster_ns, cluster=True)
        calls: list[list[str]] = []
        real = b._read

        async def record(keys: Sequence[str] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
            calls.append(list(keys))
            return await real(keys=keys, args=args, client=client)

        b._read = record  # type: ignore[assignment]
        pairs = [(v, str(e["card_id"])) for v in views for _, e in records[:50]]
        try:
            return await a.read_pairs(pairs, now), await b.read_pairs(pairs, now), calls
        finally:
            await a.close()
            await b.close()

    now = max(int(e["ts"]) for _, e in records)
    rows_a, rows_b, calls = asyncio.run(both())
    assert len(calls) > 1
    for keys in calls:
        assert len({slot_of(k) for k in keys}) == 1
    assert_rows_equal(rows_a, rows_b)
    assert [r.status for r in rows_a].count("present") == len(rows_a)
    single.close()
    cluster.close()
    client.close()
