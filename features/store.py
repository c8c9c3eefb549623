"""The Redis online store: one hash per (entity, view version), exactly-once per key, Redis-Cluster ready.

Layout (``ns`` is the deployment's namespace, its topic prefix, so deployments can share one Redis)::

    {ns}tide:f:{<entity name>=<entity>}:<view>@<version>     hash, one per entity and view version
        <tile>              that tile's partial aggregate, packed (see :func:`pack`)
        m                   "{newest event time} {lowest tile kept}"
        ts                  newest event time (what freshness probes read)
        @<topic>:<partition> position of the last record of that partition folded into this key
    {ns}tide:pos:<view>@<version>                             hash, one per view version
        <topic>:<partition>      last applied position of the partition for this view version
        <topic>:<partition>:wm   that partition's watermark (the newest event time seen in it) there

The hash tag ``{<entity name>=<entity>}`` puts every key of one entity (every view, every version) in
one Redis Cluster hash slot, so one script call can touch all of them atomically.

A batch of one source partition is applied by :file:`lua/apply.lua`: per key it compares the key's
stored position ``q`` of the partition with the positions of the first and last records the batch
folded into it: ``q >= last`` applied already (skipped), ``q < first`` merged (and ``q`` becomes
``last``), anything else a *conflict*: another writer applied part of it, nothing is written and the
caller refolds that key from its records after ``q`` (the per-record lateness decisions depend only on
the partition's prefix, so the refold is exact) and tries again (:func:`apply_until_settled`). Restarts,
rebalances and concurrent writers thus never count an event twice for any key, with no cross-key
compare-and-set. The view versions' positions and watermarks are moved forward (max) after the batch's
key writes: in the same call on a single node, in a call of their own per slot on a cluster
(``cluster=True``; entity writes are then one call per hash slot). A position is where a restart
resumes; a key ahead of it is protected by its own position.

Packed partial: ``slot=value`` lines (slot names of :mod:`features.aggregations`). Additive slots are
merged by the script with ``%.17g`` (doubles round-trip exactly; counts stay exact integers), extremes
keep the winning text unchanged, ``last:F`` is ``"{event time} {JSON value}"`` and the later time wins,
``d:F`` is a sorted JSON array of at most ``DISTINCT_K`` value hashes (a KMV sketch, see
:mod:`features.aggregations`), merged by union keeping the K smallest: bounded, whatever one tile sees.
A read is one script call per hash slot (one in all on a single node) returning only the windows' tiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from features import aggregations, tiles
from features.packed import pack as pack  # re-exported (tests, tools)
from features.packed import packer
from features.packed import unpack as unpack
from infra.errors import StreamError
from schemas.definitions import FeatureView

_LUA = Path(__file__).with_name("lua")
APPLY_SCRIPT = (_LUA / "apply.lua").read_text().replace("DISTINCT_K", str(aggregations.DISTINCT_K))
READ_SCRIPT = (_LUA / "read.lua").read_text()

Status = Literal["present", "missing", "expired"]


@dataclass(frozen=True)
class FeatureRow:
    """One entity's feature values from one view, with where they stand in time.

    ``status`` is ``missing`` when the store has nothing for the entity and ``expired`` when its newest
    event is older than the view's TTL; both carry the declared defaults, never stale values.
    """

    entity: str
    view: str
    values: dict[str, Any]
    status: Status
    newest_event_ms: int | None  # event time of the newest event in the store for this entity
    age_ms: int | None  # now - newest_event_ms
    window: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "view": self.view,
            "values": self.values,
            "status": self.status,
            "newest_event_ms": self.newest_event_ms,
            "age_ms": self.age_ms,
            "window": self.window,
        }


# --- keys -----------------------------------------------------------------------------------------------


def entity_key(view: FeatureView, entity: str, namespace: str = "") -> str:
    """The hash holding ``entity``'s tiles of this version of ``view`` (hash tag: the entity)."""
    return f"{namespace}tide:f:{{{view.entity.name}={entity}}}:{view.ref}"


def positions_key(view: FeatureView, namespace: str = "") -> str:
    """The positions and watermarks of this version of ``view``, per source partition."""
    return f"{namespace}tide:pos:{view.ref}"


offsets_key = positions_key  # the earlier name (bench/features.py reads positions through it)


def view_key_pattern(view: FeatureView, namespace: str = "") -> str:
    """A SCAN pattern matching every entity hash of this version of ``view``."""
    return f"{namespace}tide:f:{{*}}:{view.ref}"


def slot_of(key: str) -> int:
    """The key's Redis Cluster hash slot."""
    return int(key_slot(key.encode()))


# --- writing --------------------------------------------------------------------------------------------

_KIND = {"sliding": "s", "hopping": "s", "tumbling": "t", "lifetime": "l"}


@dataclass(frozen=True)
class ViewBatch:
    """What one batch of one ordered input (a source partition) applies to one view version.

    ``source`` names the input (``topic:partition``); each key keeps its position of it in field
    ``@{source}``. ``deltas`` (entity -> delta) carry the positions of the first and last records folded
    into each key (:func:`features.tiles.fold_partition`). ``position`` and ``watermark`` move the view
    version's ``position_field`` (default: ``source``) forward once every key is written.
    """

    view: FeatureView
    source: str
    deltas: Mapping[str, tiles.EntityDelta]
    position: int
    watermark: int
    position_field: str = ""

    @property
    def field(self) -> str:
        return self.position_field or self.source


@dataclass(frozen=True)
class Conflict:
    """A key another writer applied part of the batch to: refold ``entity`` of batch ``batch`` (an
    index into the batches applied) from its records after position ``applied``."""

    batch: int
    entity: str
    applied: int


@dataclass
class ApplyCall:
    """One call of :data:`APPLY_SCRIPT`: its keys and arguments, and per run of entries the index of
    the batch it comes from and its entities in entry order (to name conflicts)."""

    keys: list[str]
    args: list[Any]
    runs: list[tuple[int, Collection[str]]] = field(default_factory=list)

    def entry(self, number: int) -> tuple[int, str]:
        """(batch index, entity) of the call's entry ``number`` (1-based, as the script counts)."""
        number -= 1
        for batch, entities in self.runs:
            if number < len(entities):
                return batch, list(entities)[number]
            number -= len(entities)
        raise IndexError(number)


class _CallBuilder:
    """Accumulates one call: the entries' keys and arguments run by run (a run: the entries of one
    batch in this call), then the positions to move."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.entries: list[str] = []
        self.views: dict[str, int] = {}
        self.view_rows: list[list[Any]] = []
        self.runs: list[list[Any]] = []
        self.named: list[tuple[int, Collection[str]]] = []
        self.positions: list[list[Any]] = []

    def view(self, view: FeatureView) -> int:
        index = self.views.get(view.ref)
        if index is None:
            index = self.views[view.ref] = len(self.views) + 1
            self.view_rows.append([_KIND[view.kind], view.tile_ms, view.window_ms, _ttl(view)])
        return index

    def add(
        self, index: int, batch: ViewBatch, deltas: Mapping[str, tiles.EntityDelta], namespace: str
    ) -> None:
        """The entries of ``deltas`` (all or some of ``batch``'s, the ``index``-th batch) as one run."""
        view = batch.view
        self.runs.append([self.view(view), "@" + batch.source, index + 1, len(deltas)])
        self.named.append((index, deltas))
        _encode(view, deltas, namespace, self.keys, self.entries)

    def call(self) -> ApplyCall:
        header = orjson.dumps([self.view_rows, self.runs])
        positions = orjson.dumps(self.positions) if self.positions else b""
        return ApplyCall(self.keys, [header, positions, "".join(self.entries)], self.named)


def _ttl(view: FeatureView) -> str:
    """An entity hash's expiry in ms ("0": never)."""
    retention = tiles.retention_ms(view)
    return "0" if retention is None else str(retention)


def _encode(
    view: FeatureView,
    deltas: Mapping[str, tiles.EntityDelta],
    namespace: str,
    keys: list[str],
    entries: list[str],
) -> None:
    """Appends each entity's key to ``keys`` and its entry to ``entries``: ``"\\30first last newest n
    tile\\31packed"`` and ``"\\31tile\\31packed"`` per further tile (see :file:`lua/apply.lua`). Tiles
    already behind the window of the entity's newest event are left out (the script would trim them at
    once); the newest event's own tile never is."""
    lifetime, tile_ms = view.kind == "lifetime", view.tile_ms
    span = 0 if view.kind == "tumbling" else view.window_ms - tile_ms
    prefix, suffix = f"{namespace}tide:f:{{{view.entity.name}=", f"}}:{view.ref}"
    add_key, add, pack = keys.append, entries.append, packer(view)
    for entity, delta in deltas.items():
        add_key(prefix + entity + suffix)
        found = delta.tiles
        if len(found) == 1:  # the common case: one tile, the newest event's
            for tile, partial in found.items():
                add(f"\x1e{delta.first} {delta.last} {delta.newest_ms} 1 {tile}\x1f{pack(partial)}")
            continue
        newest = delta.newest_ms
        cutoff = 0 if lifetime else newest - newest % tile_ms - span
        kept = [f"{tile}\x1f{pack(partial)}" for tile, partial in found.items() if tile >= cutoff]
        add(f"\x1e{delta.first} {delta.last} {newest} {len(kept)} " + "\x1f".join(kept))


def apply_calls(
    batches: Sequence[ViewBatch], namespace: str = "", *, cluster: bool = False
) -> list[ApplyCall]:
    """The :data:`APPLY_SCRIPT` calls that apply ``batches``.

    Single node: one call for everything, positions included (moved unless a key of their batch
    conflicted). Cluster: one call per hash slot of the entity keys, positions left out: the caller
    moves them with :func:`position_calls` once its batches settled.
    """
    if not cluster:
        single = _CallBuilder()
        for index, batch in enumerate(batches):
            if batch.deltas:
                single.add(index, batch, batch.deltas, namespace)
        if not single.keys:
            return []
        for index, batch in enumerate(batches):
            single.keys.append(positions_key(batch.view, namespace))
            at = len(single.keys)
            single.positions.append([at, index + 1, batch.field, batch.position, batch.watermark])
        return [single.call()]
    builders: dict[int, _CallBuilder] = {}
    slots: dict[str, int] = {}
    for index, batch in enumerate(batches):
        by_slot: dict[int, dict[str, tiles.EntityDelta]] = {}
        head = f"{namespace}tide:f:{{{batch.view.entity.name}="
        for entity, delta in batch.deltas.items():
            tag = head + entity + "}"  # the key up to its hash tag: the slot of every key of the entity
            slot = slots.get(tag)
            if slot is None:
                slot = slots[tag] = slot_of(tag)
            by_slot.setdefault(slot, {})[entity] = delta
        for slot, deltas in by_slot.items():
            b = builders.get(slot)
            if b is None:
                b = builders[slot] = _CallBuilder()
            b.add(index, batch, deltas, namespace)
    return [b.call() for b in builders.values()]


def position_calls(batches: Sequence[ViewBatch], namespace: str = "") -> list[ApplyCall]:
    """Calls that move the view versions' positions of ``batches`` forward, one per positions hash."""
    builders: dict[str, _CallBuilder] = {}
    for index, batch in enumerate(batches):
        key = positions_key(batch.view, namespace)
        b = builders.get(key)
        if b is None:
            b = builders[key] = _CallBuilder()
            b.keys.append(key)
        b.positions.append([1, index + 1, batch.field, batch.position, batch.watermark])
    return [b.call() for b in builders.values()]


def conflicts_of(calls: Sequence[ApplyCall], results: Sequence[Any]) -> list[Conflict]:
    """The conflicts the calls' results name."""
    out = []
    for call, result in zip(calls, results, strict=True):
        for i in range(0, len(result), 2):
            batch, entity = call.entry(int(result[i]))
            out.append(Conflict(batch, entity, int(result[i + 1])))
    return out


MAX_ATTEMPTS = 5  # conflicts in a row before a batch is given up on (another writer keeps moving it)
T = TypeVar("T")


def apply_until_settled(
    todo: list[T], attempt: Callable[[list[T]], list[T]], what: str, attempts: int = MAX_ATTEMPTS
) -> None:
    """The retry loop every writer of the store shares (the processor, the Flink job).

    ``attempt`` applies what it can of ``todo`` and returns what is left to redo (keys refolded after a
    conflict: another writer applied part of them). Raises :class:`StreamError` when something is still
    left after ``attempts`` tries.
    """
    for _ in range(attempts):
        todo = attempt(todo)
        if not todo:
            return
    raise StreamError(f"the store kept refusing batches of {what}: {todo!r}"[:500])


def refold(
    batch: ViewBatch,
    conflicts: Sequence[Conflict],
    records: Sequence[tuple[int, Mapping[str, Any]]],
    watermark: int,
) -> ViewBatch:
    """``batch`` again with only its conflicted keys, each refolded from its records after the key's
    stored position. ``records`` and ``watermark`` are those the batch was folded from."""
    deltas = {}
    for c in conflicts:
        redone = tiles.refold_key(batch.view, records, watermark, c.entity, c.applied)
        if redone is not None:
            deltas[c.entity] = redone
    return ViewBatch(batch.view, batch.source, deltas, batch.position, batch.watermark, batch.position_field)


# --- reading --------------------------------------------------------------------------------------------


def parse_tiles(raw: Sequence[Any]) -> dict[int, dict[str, Any]]:
    """Tiles' partials from ``[tile, packed, tile, packed...]`` as the read script returns them."""
    return {int(raw[i]): unpack(raw[i + 1]) for i in range(0, len(raw), 2)}


def row_of(
    view: FeatureView,
    entity: str,
    meta: bytes | str | None,
    packed_tiles: Sequence[Any],
    now_ms: int,
) -> FeatureRow:
    """A row from the key's ``m`` field and its window's packed tiles."""
    window = view.describe()
    if not meta:
        return FeatureRow(
            entity, view.name, tiles.window_values(view, {}, now_ms), "missing", None, None, window
        )
    newest = int(float((meta.decode() if isinstance(meta, bytes) else meta).partition(" ")[0]))
    age = now_ms - newest
    if view.ttl_ms is not None and age > view.ttl_ms:
        return FeatureRow(
            entity, view.name, tiles.window_values(view, {}, now_ms), "expired", newest, age, window
        )
    values = tiles.window_values(view, parse_tiles(packed_tiles), now_ms)
    return FeatureRow(entity, view.name, values, "present", newest, age, window)


def read_calls(
    pairs: Sequence[tuple[FeatureView, str]], now_ms: int, namespace: str = "", *, cluster: bool = False
) -> list[tuple[list[str], list[list[int]]]]:
    """The read script's calls for ``(view, entity)`` pairs: ``(keys, [[first tile, last tile] per
    key])``, each key asked once; one call in all, or one per hash slot when ``cluster``."""
    calls: dict[int, tuple[list[str], list[list[int]]]] = {}
    seen: set[str] = set()
    for view, entity in pairs:
        key = entity_key(view, entity, namespace)
        if key in seen:
            continue
        seen.add(key)
        slot = slot_of(key) if cluster else 0
        call = calls.get(slot)
        if call is None:
            call = calls[slot] = ([], [])
        call[0].append(key)
        call[1].append([tiles.first_tile(view, now_ms), tiles.tile_of(view, now_ms)])
    return list(calls.values())


def _rows(
    pairs: Sequence[tuple[FeatureView, str]],
    calls: Sequence[tuple[list[str], list[list[int]]]],
    answers: Sequence[Any],
    namespace: str,
    now_ms: int,
) -> list[FeatureRow]:
    found: dict[str, list[Any]] = {}
    for (keys, _), rows in zip(calls, answers, strict=True):
        found.update(zip(keys, rows, strict=True))
    out = []
    for view, entity in pairs:
        meta, *packed = found[entity_key(view, entity, namespace)]
        out.append(row_of(view, entity, meta, packed, now_ms))
    return out


def _positions(raw: Sequence[Any]) -> list[tuple[int, int]]:
    return [
        (int(pos) if pos is not None else -1, int(wm) if wm is not None else tiles.NO_WATERMARK)
        for pos, wm in raw
    ]


class RedisOnlineStore:
    """Reads (and, for tests and tools, writes) feature tiles in Redis (asyncio client).

    ``cluster``: the client is a Redis Cluster client; calls are then made per hash slot.
    """

    def __init__(self, client: aioredis.Redis, namespace: str = "", *, cluster: bool = False) -> None:
        self.client = client
        self.namespace = namespace
        self.cluster = cluster
        self._apply = client.register_script(APPLY_SCRIPT)
        self._read = client.register_script(READ_SCRIPT)

    @classmethod
    def from_url(cls, url: str, namespace: str = "") -> RedisOnlineStore:
        return cls(aioredis.Redis.from_url(url), namespace)

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def position(self, view: FeatureView, source: str) -> tuple[int, int]:
        """A view version's applied position and watermark of ``source`` (-1, -1 when none)."""
        raw = await self.client.hmget(positions_key(view, self.namespace), [source, f"{source}:wm"])
        return _positions([raw])[0]

    async def apply(self, batches: Sequence[ViewBatch]) -> list[Conflict]:
        """Applies ``batches`` (see :func:`apply_calls`); returns the conflicts (nothing of their
        keys written, their batches' positions not moved)."""
        calls = apply_calls(batches, self.namespace, cluster=self.cluster)
        results = [await self._apply(keys=c.keys, args=c.args) for c in calls]
        conflicts = conflicts_of(calls, results)
        if self.cluster:
            refused = {c.batch for c in conflicts}
            settled = [b for i, b in enumerate(batches) if i not in refused]
            for c in position_calls(settled, self.namespace):
                await self._apply(keys=c.keys, args=c.args)
        return conflicts

    async def read_pairs(
        self, pairs: Sequence[tuple[FeatureView, str]], now_ms: int | None = None
    ) -> list[FeatureRow]:
        """Current values of each ``(view, entity)`` pair (the view object names its version), in the
        order asked: one script call in all (one per hash slot on a cluster), whatever the views,
        sources and entity types: what a model's features need."""
        if not pairs:
            return []
        now = int(time.time() * 1000) if now_ms is None else now_ms
        calls = read_calls(pairs, now, self.namespace, cluster=self.cluster)
        if len(calls) == 1:
            answers = [await self._read(keys=calls[0][0], args=[orjson.dumps(calls[0][1])])]
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, windows in calls:
                    await self._read(keys=keys, args=[orjson.dumps(windows)], client=pipe)
                answers = await pipe.execute()
        return _rows(pairs, calls, answers, self.namespace, now)

    async def read_many(
        self, views: Sequence[FeatureView], entities: Sequence[str], now_ms: int | None = None
    ) -> dict[str, list[FeatureRow]]:
        """Current values of many views for many entities (every view for every entity), in one round
        trip; rows per view name, in the order of ``entities``."""
        rows = await self.read_pairs([(view, entity) for view in views for entity in entities], now_ms)
        n = len(entities)
        return {view.name: rows[i * n : (i + 1) * n] for i, view in enumerate(views)}

    async def read(
        self, view: FeatureView, entities: Sequence[str], now_ms: int | None = None
    ) -> list[FeatureRow]:
        """Current values of one view for many entities in one round trip."""
        return await self.read_pairs([(view, entity) for entity in entities], now_ms)


class RedisWriter:
    """The write side for a synchronous caller (the feature processor, the Flink job): positions and
    applies, each a single round trip (one call per hash slot when ``cluster``)."""

    def __init__(self, client: redis.Redis, namespace: str = "", *, cluster: bool = False) -> None:
        self.client = client
        self.namespace = namespace
        self.cluster = cluster
        self._apply = client.register_script(APPLY_SCRIPT)

    @classmethod
    def from_url(cls, url: str, namespace: str = "", *, cluster: bool = False) -> RedisWriter:
        return cls(redis.Redis.from_url(url), namespace, cluster=cluster)

    def close(self) -> None:
        self.client.close()

    def positions(self, view_versions: Sequence[FeatureView], partition: str) -> list[tuple[int, int]]:
        """``(position, watermark)`` of ``partition`` for each view version; -1, -1 where none."""
        return self.positions_of([(view, partition) for view in view_versions])

    def positions_of(self, pairs: Sequence[tuple[FeatureView, str]]) -> list[tuple[int, int]]:
        """``(position, watermark)`` of each (view version, source partition), in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for view, source in pairs:
                pipe.hmget(positions_key(view, self.namespace), [source, f"{source}:wm"])
            return _positions(pipe.execute())

    def run(self, calls: Sequence[ApplyCall]) -> list[Any]:
        """Runs apply calls in one pipeline (a single one directly: a pipeline would first ask whether
        the script is loaded); their raw results."""
        if not calls:
            return []
        if len(calls) == 1:
            return [self._apply(keys=calls[0].keys, args=calls[0].args)]
        with self.client.pipeline(transaction=False) as pipe:
            for call in calls:
                self._apply(keys=call.keys, args=call.args, client=pipe)
            return list(pipe.execute())

    def apply(self, batches: Sequence[ViewBatch]) -> list[Conflict]:
        """Applies ``batches`` (see :func:`apply_calls`); returns the conflicts (nothing of their keys
        written, their batches' positions not moved: redo them with :func:`refold`)."""
        calls = apply_calls(batches, self.namespace, cluster=self.cluster)
        conflicts = conflicts_of(calls, self.run(calls))
        if self.cluster:
            refused = {c.batch for c in conflicts}
            self.run(position_calls([b for i, b in enumerate(batches) if i not in refused], self.namespace))
        return conflicts
