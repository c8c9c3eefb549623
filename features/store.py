"""The Redis online store: one hash per entity for all views of a source, written atomically with the
source partition's position and watermark.

Layout (``ns`` is the deployment's namespace, its topic prefix, so deployments can share one Redis)::

    {ns}tide:f:{source}:{entity field}:{entity}     hash
        {view}:{tile}   that tile's partial aggregate, packed (see :func:`pack`)
        {view}:m        "{newest event time} {lowest tile kept}" of the view
        ts              newest event time of any view (what freshness probes read)
        seen            wall time of the last write
    {ns}tide:f:{source}:offsets                     hash
        {topic}:{partition}      last applied position
        {topic}:{partition}:wm   that partition's watermark (the newest event time seen in it)

A batch of one source partition is applied by one Lua script for every view of the source: it checks
the partition's stored position, merges the batch's partials into the stored ones and advances the
position and watermark in one atomic step. Records at or below the stored position are left out before
the call, so a replay after a crash or a rebalance never counts an event twice (exactly-once effect on
top of at-least-once delivery). Per entity the script makes one ``HMGET``, one ``HSET`` and one
``PEXPIRE`` whatever the number of views and slots; the caller merges a batch's events per (entity,
view, tile) first. A read is one script call that returns only the requested windows' tiles.

Packed partial: ``slot=value`` lines (slot names of :mod:`features.aggregations`). Additive slots are
merged by the script with ``%.17g`` (doubles round-trip exactly; counts stay exact integers), extremes
keep the winning text unchanged, ``last:F`` is ``"{event time} {JSON value}"`` and the later time wins,
``d:F`` is a sorted JSON array of at most ``DISTINCT_K`` value hashes (a KMV sketch, see
:mod:`features.aggregations`), merged by union keeping the K smallest: bounded, whatever one tile sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
import redis
import redis.asyncio as aioredis

from features import aggregations, tiles
from infra.errors import StreamError
from schemas.definitions import FeatureView

# KEYS[1]: the source's offsets hash. ARGV: partition (``topic:partition``), expected position, new
# position, watermark, now, a JSON header and a JSON document (see apply_command). Returns APPLIED, or
# the stored position if it is not the expected one (nothing written then). Event times and tiles travel
# as JSON numbers (exact below 2^53) and are written back with %d, never with Lua's 14-digit tostring.
APPLY_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or '-1'
if cur ~= ARGV[2] then return tonumber(cur) end
local now = ARGV[5]
local header = cjson.decode(ARGV[6])
local groups, views = header[1], header[2]
local gmatch, byte, match, format = string.gmatch, string.byte, string.match, string.format
local LINE = '([^=\\n]+)=([^\\n]*)'
local function merge(old, new)
  if not old then return new end
  local vals, order = {}, {}
  for name, v in gmatch(old, LINE) do order[#order + 1] = name; vals[name] = v end
  for name, v in gmatch(new, LINE) do
    local c = vals[name]
    if c == nil then
      order[#order + 1] = name; vals[name] = v
    else
      local b = byte(name, 1)
      if b == 108 then -- last:F, "time value": the later time wins (ties: the newer write)
        if tonumber(match(v, '^(%S+)')) >= tonumber(match(c, '^(%S+)')) then vals[name] = v end
      elseif b == 109 and byte(name, 2) == 105 then -- min:F
        if tonumber(v) < tonumber(c) then vals[name] = v end
      elseif b == 109 then -- max:F
        if tonumber(v) > tonumber(c) then vals[name] = v end
      elseif b == 100 then -- d:F, a sorted JSON array of value hashes: the union's K smallest
        local have, seen, added = cjson.decode(c), {}, false
        for _, x in ipairs(have) do seen[x] = true end
        for _, x in ipairs(cjson.decode(v)) do
          if not seen[x] then seen[x] = true; have[#have + 1] = x; added = true end
        end
        if added then -- written with %d: cjson would round these 16-digit integers to 14 digits
          table.sort(have)
          local parts = {}
          for i = 1, math.min(#have, DISTINCT_K) do parts[i] = format('%d', have[i]) end
          vals[name] = '[' .. table.concat(parts, ',') .. ']'
        end
      else -- counts, sums, histogram buckets
        vals[name] = format('%.17g', tonumber(c) + tonumber(v))
      end
    end
  end
  local out = {}
  for i, name in ipairs(order) do out[i] = name .. '=' .. vals[name] end
  return table.concat(out, '\\n')
end
for _, e in ipairs(cjson.decode(ARGV[7])) do
  local group = groups[e[1]]
  local key = group[1] .. e[2]
  local touched = e[4]
  local fields = {'ts'}
  for _, t in ipairs(touched) do
    local name = views[t[1]][1]
    fields[#fields + 1] = name .. ':m'
    for i = 3, #t do fields[#fields + 1] = name .. ':' .. format('%d', t[i][1]) end
  end
  local old = redis.call('HMGET', key, unpack(fields))
  local ts = format('%d', e[3])
  if old[1] and tonumber(old[1]) > e[3] then ts = old[1] end
  local out = {'ts', ts, 'seen', now}
  local trims = nil
  local at = 2
  for _, t in ipairs(touched) do
    local v = views[t[1]]
    local name, kind, tile_ms, window_ms = v[1], v[2], v[3], v[4]
    local newest = t[2]
    local cutoff = 0
    if kind == 't' then cutoff = newest - newest % tile_ms
    elseif kind == 's' then cutoff = newest - newest % tile_ms - window_ms + tile_ms end
    local lo = nil
    local meta = old[at]
    at = at + 1
    local newest_s = format('%d', newest)
    if meta then
      local on, ol = match(meta, '^(%S+) (%S+)$')
      if tonumber(on) > newest then newest_s = on end
      lo = tonumber(ol)
    end
    for i = 3, #t do
      local tile = t[i]
      local f = fields[at]
      out[#out + 1] = f
      out[#out + 1] = merge(old[at], tile[2])
      at = at + 1
      if lo == nil or tile[1] < lo then lo = tile[1] end
    end
    if lo < cutoff then
      trims = trims or {}
      trims[name .. ':'] = cutoff
      lo = cutoff
    end
    out[#out + 1] = name .. ':m'
    out[#out + 1] = newest_s .. ' ' .. format('%d', lo)
  end
  if trims then
    local gone = {}
    for _, f in ipairs(redis.call('HKEYS', key)) do
      local p, t = match(f, '^(.*:)(%d+)$')
      if p and trims[p] and tonumber(t) < trims[p] then gone[#gone + 1] = f end
    end
    if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  end
  redis.call('HSET', key, unpack(out))
  if group[2] ~= '0' then redis.call('PEXPIRE', key, group[2]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[1] .. ':wm', ARGV[4])
return -2
""".replace("DISTINCT_K", str(aggregations.DISTINCT_K))
APPLIED = -2  # what APPLY_SCRIPT returns on success (otherwise: the stored position)

# ARGV[1]: JSON [[entity key, [[view, first tile, last tile]...]]...]. Returns per entity key, per view:
# {meta or false, tile, packed, tile, packed...}: only the window's tiles cross the wire.
READ_SCRIPT = """
local out = {}
for i, req in ipairs(cjson.decode(ARGV[1])) do
  local all = redis.call('HGETALL', req[1])
  local rows = {}
  for j, v in ipairs(req[2]) do
    local prefix, lo, hi = v[1] .. ':', v[2], v[3]
    local n = #prefix
    local row = {false}
    for k = 1, #all, 2 do
      local f = all[k]
      if string.sub(f, 1, n) == prefix then
        local rest = string.sub(f, n + 1)
        if rest == 'm' then
          row[1] = all[k + 1]
        else
          local t = tonumber(rest)
          if t and t >= lo and t <= hi then
            row[#row + 1] = rest
            row[#row + 1] = all[k + 1]
          end
        end
      end
    end
    rows[j] = row
  end
  out[i] = rows
end
return out
"""

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


def entity_key(view: FeatureView, entity: str, namespace: str = "") -> str:
    """The hash holding ``entity``'s tiles of ``view`` and of every other view of its source and entity
    field (its ``ts`` field is the entity's newest event time)."""
    return f"{namespace}tide:f:{view.source_name}:{view.entity_key}:{entity}"


def offsets_key(view: FeatureView, namespace: str = "") -> str:
    """The positions and watermarks of ``view``'s source partitions (shared by the source's views)."""
    return f"{namespace}tide:f:{view.source_name}:offsets"


# --- packed partials ------------------------------------------------------------------------------------


def pack(partial: Mapping[str, Any]) -> str:
    """One tile's partial as one hash field value.

    Numeric slots hold floats, ``last:`` slots (time, value) tuples, ``d:`` slots sets (written as a
    sorted JSON array).
    """
    lines = []
    for slot, value in partial.items():
        kind = type(value)
        if kind is float:
            lines.append(f"{slot}={_number(value)}")
        elif kind is tuple:
            lines.append(f"{slot}={value[0]} {orjson.dumps(value[1]).decode()}")
        elif kind is set:
            lines.append(f"{slot}={orjson.dumps(sorted(value)[: aggregations.DISTINCT_K]).decode()}")
        else:
            lines.append(f"{slot}={_number(float(value))}")
    return "\n".join(lines)


def unpack(packed: bytes | str) -> dict[str, Any]:
    """The partial of a packed field (the inverse of :func:`pack`, after any number of merges)."""
    text = packed.decode() if isinstance(packed, bytes) else packed
    out: dict[str, Any] = {}
    for line in text.split("\n"):
        slot, _, value = line.partition("=")
        if slot.startswith("last:"):
            ts, _, raw = value.partition(" ")
            out[slot] = (int(float(ts)), orjson.loads(raw))
        elif slot.startswith("d:"):
            out[slot] = set(orjson.loads(value))
        else:
            out[slot] = float(value)
    return out


# --- writing --------------------------------------------------------------------------------------------


def _ttl(views: Sequence[FeatureView]) -> str:
    """The entity hash's expiry: as long as its longest-lived view needs it ("0": never)."""
    retentions = [tiles.retention_ms(v) for v in views]
    return "0" if any(r is None for r in retentions) else str(max(r for r in retentions if r is not None))


_KIND = {"sliding": "s", "hopping": "s", "tumbling": "t", "lifetime": "l"}


def _number(value: float) -> str:
    """A slot value's text: integers without a fraction (counts stay short and exact), else repr."""
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def apply_payload(
    views: Sequence[FeatureView],
    namespace: str,
    deltas: Mapping[str, Mapping[str, tiles.EntityDelta]],
) -> tuple[list[Any], list[Any]]:
    """The script's header and per-entity document for one batch of the views of one source
    (``deltas``: view name -> entity -> delta).

    Header: ``[[[key prefix, expiry] per entity field], [[view, kind (s/t/l), tile ms, window ms] per
    view]]``. Per entity: ``[entity field index, entity, newest, [[view index, newest, [tile,
    packed]...]...]]`` (indices 1-based, for Lua). Tiles already behind the window of the batch's newest
    event are left out (the script would trim them at once); the script derives field names and the
    window's first tile from the header.
    """
    fields: dict[str, list[FeatureView]] = {}
    for view in views:
        fields.setdefault(view.entity_key, []).append(view)
    field_index = {f: i for i, f in enumerate(fields, start=1)}
    header: list[Any] = [
        [[f"{namespace}tide:f:{vs[0].source_name}:{f}:", _ttl(vs)] for f, vs in fields.items()],
        [],
    ]
    per_entity: dict[tuple[int, str], list[Any]] = {}
    for index, view in enumerate(views, start=1):
        by_entity = deltas.get(view.name)
        header[1].append([view.name, _KIND[view.kind], view.tile_ms, view.window_ms])
        if not by_entity:
            continue
        group = field_index[view.entity_key]
        lifetime, tumbling, tile_ms = view.kind == "lifetime", view.kind == "tumbling", view.tile_ms
        span = 0 if tumbling else view.window_ms - tile_ms
        for entity, delta in by_entity.items():
            newest = delta.newest_ms
            cutoff = 0 if lifetime else newest - newest % tile_ms - span
            touched: list[Any] = [index, newest]
            for tile, partial in delta.tiles.items():
                if tile >= cutoff:
                    touched.append([tile, pack(partial)])
            entry = per_entity.get((group, entity))
            if entry is None:
                per_entity[(group, entity)] = [group, entity, newest, [touched]]
            else:
                if newest > entry[2]:
                    entry[2] = newest
                entry[3].append(touched)
    return header, list(per_entity.values())


def apply_command(
    views: Sequence[FeatureView],
    namespace: str,
    source: str,
    deltas: Mapping[str, Mapping[str, tiles.EntityDelta]],
    expected_position: int,
    new_position: int,
    watermark: int,
) -> tuple[list[str], list[Any]]:
    """Keys and arguments of :data:`APPLY_SCRIPT`: merge ``deltas`` (view name -> entity -> delta, see
    :func:`features.tiles.fold_partition`) and move ``source`` from ``expected_position`` to
    ``new_position`` and ``watermark``.

    ``views`` are the views of one source; ``source`` names an ordered input of it
    (``topic:partition`` for Kafka) whose positions are its offsets. Any client (asyncio, sync, a Flink
    operator) runs the script with these, so every writer keeps the same layout and guarantees.
    """
    header, entities = apply_payload(views, namespace, deltas)
    keys = [offsets_key(views[0], namespace)]
    args: list[Any] = [
        source,
        str(expected_position),
        str(new_position),
        str(watermark),
        str(int(time.time() * 1000)),
        orjson.dumps(header),
        orjson.dumps(entities),
    ]
    return keys, args


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
    """A row from the view's ``{view}:m`` field and its window's packed tiles."""
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


def read_request(pairs: Sequence[tuple[FeatureView, str]], now_ms: int, namespace: str = "") -> list[Any]:
    """The read script's document for ``(view, entity)`` pairs: per entity hash (pairs of one source and
    entity field share one), the views read from it and their windows, each asked once."""
    per_key: dict[str, tuple[list[Any], set[str]]] = {}
    for view, entity in pairs:
        key = entity_key(view, entity, namespace)
        entry = per_key.get(key)
        if entry is None:
            entry = per_key[key] = ([key, []], set())
        if view.name not in entry[1]:
            entry[1].add(view.name)
            entry[0][1].append([view.name, tiles.first_tile(view, now_ms), tiles.tile_of(view, now_ms)])
    return [request for request, _ in per_key.values()]


MAX_ATTEMPTS = 5  # refusals in a row before a batch is given up on (another writer keeps moving it)
T = TypeVar("T")


def apply_until_settled(
    todo: list[T], attempt: Callable[[list[T]], list[T]], what: str, attempts: int = MAX_ATTEMPTS
) -> None:
    """The compare-and-set retry loop every writer of the store shares (the processor, the Flink job).

    ``attempt`` applies what it can of ``todo`` (each batch checked against its partition's stored
    position by :data:`APPLY_SCRIPT`) and returns the batches refused because another writer moved the
    position; they are tried again from the stored position. Raises :class:`StreamError` when batches
    are still refused after ``attempts`` tries.
    """
    for _ in range(attempts):
        todo = attempt(todo)
        if not todo:
            return
    raise StreamError(f"the store kept refusing batches of {what}: {todo!r}"[:500])


class RedisOnlineStore:
    """Reads and writes feature tiles in Redis (asyncio client)."""

    def __init__(self, client: aioredis.Redis, namespace: str = "") -> None:
        self.client = client
        self.namespace = namespace
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
        """A source partition's applied position and watermark (-1, -1 when nothing was applied)."""
        pos, wm = await self.client.hmget(offsets_key(view, self.namespace), [source, f"{source}:wm"])
        return (int(pos) if pos is not None else -1, int(wm) if wm is not None else tiles.NO_WATERMARK)

    async def apply(
        self,
        view: FeatureView,
        source: str,
        events: Sequence[Mapping[str, Any]],
        expected_position: int,
        new_position: int,
        watermark: int,
    ) -> bool:
        """Fold on-time ``events`` into one view and advance ``source`` atomically.

        Returns False, writing nothing, if the stored position is not ``expected_position`` (another
        writer moved it): the caller re-reads it and skips what is done. A source with several views
        is applied with :meth:`apply_fold`, all views at once, since they share the position.
        """
        deltas = {view.name: tiles.batch_deltas(view, events)}
        return await self.apply_fold([view], source, deltas, expected_position, new_position, watermark)

    async def apply_fold(
        self,
        views: Sequence[FeatureView],
        source: str,
        deltas: Mapping[str, Mapping[str, tiles.EntityDelta]],
        expected_position: int,
        new_position: int,
        watermark: int,
    ) -> bool:
        """Merge per-view ``deltas`` and advance ``source`` atomically (see :func:`apply_command`)."""
        keys, args = apply_command(
            views, self.namespace, source, deltas, expected_position, new_position, watermark
        )
        return int(await self._apply(keys=keys, args=args)) == APPLIED

    async def read_pairs(
        self, pairs: Sequence[tuple[FeatureView, str]], now_ms: int | None = None
    ) -> list[FeatureRow]:
        """Current values of each ``(view, entity)`` pair, in the order asked, in one round trip (one
        script call), whatever the views, sources and entity types: what a model's features need."""
        if not pairs:
            return []
        now = int(time.time() * 1000) if now_ms is None else now_ms
        request = read_request(pairs, now, self.namespace)
        answer = await self._read(args=[orjson.dumps(request)])
        found: dict[tuple[str, str], list[Any]] = {}
        for (key, specs), rows in zip(request, answer, strict=True):
            for spec, row in zip(specs, rows, strict=True):
                found[(key, spec[0])] = row
        out = []
        for view, entity in pairs:
            meta, *packed = found[(entity_key(view, entity, self.namespace), view.name)]
            out.append(row_of(view, entity, meta, packed, now))
        return out

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
    """The write side for a synchronous caller (the feature processor): positions and applies, each a
    single round trip for any number of source partitions."""

    def __init__(self, client: redis.Redis, namespace: str = "") -> None:
        self.client = client
        self.namespace = namespace
        self._apply = client.register_script(APPLY_SCRIPT)

    @classmethod
    def from_url(cls, url: str, namespace: str = "") -> RedisWriter:
        return cls(redis.Redis.from_url(url), namespace)

    def close(self) -> None:
        self.client.close()

    def positions(self, pairs: Sequence[tuple[FeatureView, str]]) -> list[tuple[int, int]]:
        """``(position, watermark)`` of each (view of a source, source partition); -1, -1 if none."""
        with self.client.pipeline(transaction=False) as pipe:
            for view, source in pairs:
                pipe.hmget(offsets_key(view, self.namespace), [source, f"{source}:wm"])
            raw = pipe.execute()
        return [
            (int(pos) if pos is not None else -1, int(wm) if wm is not None else tiles.NO_WATERMARK)
            for pos, wm in raw
        ]

    def apply_all(self, commands: Sequence[tuple[list[str], list[Any]]]) -> list[bool]:
        """Runs :func:`apply_command` results in one pipeline; True for each one applied."""
        with self.client.pipeline(transaction=False) as pipe:
            for keys, args in commands:
                self._apply(keys=keys, args=args, client=pipe)
            return [int(r) == APPLIED for r in pipe.execute()]
