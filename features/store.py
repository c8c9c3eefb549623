"""The Redis online store: per-entity tile hashes, written atomically with the source positions.

Layout (``ns`` is the deployment's namespace, its topic prefix, so deployments can share one Redis)::

    {ns}tide:f:{view}:{entity}             hash  {tile}:{slot} -> partial aggregate slot
                                                 (see features.aggregations), ts -> newest event time,
                                                 seen -> wall time of the last write, lo -> lowest tile
    {ns}tide:f:{view}:{entity}:{tile}:d:F  HyperLogLog of field F's distinct values in a tile
    {ns}tide:f:{view}:offsets              hash  {source} -> last applied position,
                                                 {source}:wm -> that source's watermark

A batch of one source (a Kafka ``topic:partition``) is applied by one Lua script that checks the
source's stored position, folds the partials in and advances the position and watermark in one atomic
step. Records at or below the stored position are left out before the call, so a replay after a crash
or a rebalance never counts an event twice (exactly-once effect on top of at-least-once delivery).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

from features import tiles
from features.definitions import FeatureView

# ARGV: source, expected position, new position, watermark, entity TTL ms (0: none), tile TTL ms, now,
# and one JSON document: [[entity key, newest event time, oldest tile kept, [[op, field, value...]...]]...]
# (one argument instead of thousands: packing them was most of a batch's cost). Values travel as strings:
# Lua numbers would be formatted with 14 significant digits.
APPLY_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or '-1'
if cur ~= ARGV[2] then return tonumber(cur) end
local ttl, tile_ttl, now = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
for _, e in ipairs(cjson.decode(ARGV[8])) do
  local key, ts, cutoff = e[1], tonumber(e[2]), tonumber(e[3])
  local lo = nil
  local hlls = {}
  for _, op in ipairs(e[4]) do
    local kind, f, v = op[1], op[2], op[3]
    local t = tonumber(string.match(f, '^(%d+):'))
    if lo == nil or t < lo then lo = t end
    if kind == 'a' then
      redis.call('HINCRBYFLOAT', key, f, v)
    elseif kind == '<' or kind == '>' then
      local c = redis.call('HGET', key, f)
      local better = (not c) or (kind == '<' and tonumber(v) < tonumber(c))
      if (not better) and kind == '>' then better = tonumber(v) > tonumber(c) end
      if better then redis.call('HSET', key, f, v) end
    elseif kind == 'L' then
      local c = redis.call('HGET', key, f .. ':t')
      if (not c) or tonumber(v) >= tonumber(c) then
        redis.call('HSET', key, f .. ':t', v, f .. ':v', op[4])
      end
    elseif kind == 'P' then
      local hll = key .. ':' .. f
      redis.call('PFADD', hll, v)
      hlls[hll] = true
    end
  end
  if tile_ttl > 0 then
    for hll in pairs(hlls) do redis.call('PEXPIRE', hll, tile_ttl) end
  end
  local old = redis.call('HMGET', key, 'ts', 'lo')
  local new_ts = e[2]
  if old[1] and tonumber(old[1]) >= ts then new_ts = old[1] end
  local old_lo = tonumber(old[2] or '-1')
  if old_lo >= 0 and old_lo < lo then lo = old_lo end
  if lo < cutoff then
    for _, f in ipairs(redis.call('HKEYS', key)) do
      local t = tonumber(string.match(f, '^(%d+):'))
      if t and t < cutoff then redis.call('HDEL', key, f) end
    end
    lo = cutoff
  end
  redis.call('HSET', key, 'ts', new_ts, 'lo', string.format('%d', lo), 'seen', now)
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[1] .. ':wm', ARGV[4])
return -2
"""
APPLIED = -2  # what APPLY_SCRIPT returns on success (otherwise: the stored position)

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
    return f"{namespace}tide:f:{view.name}:{entity}"


def offsets_key(view: FeatureView, namespace: str = "") -> str:
    return f"{namespace}tide:f:{view.name}:offsets"


def _ops(tile: int, partial: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Script operations for one tile's partial: (op, field, value[, value])."""
    out: list[tuple[str, ...]] = []
    for slot, value in partial.items():
        field = f"{tile}:{slot}"
        if slot.startswith(("min:", "max:")):
            out.append(("<" if slot.startswith("min:") else ">", field, repr(value)))
        elif slot.startswith("last:"):
            out.append(("L", field, str(value[0]), orjson.dumps(value[1]).decode()))
        elif slot.startswith("d:"):
            out += [("P", field, element) for element in sorted(value)]
        else:
            out.append(("a", field, repr(value)))
    return out


def apply_command(
    view: FeatureView,
    namespace: str,
    source: str,
    events: Sequence[Mapping[str, Any]],
    expected_position: int,
    new_position: int,
    watermark: int,
) -> tuple[list[str], list[Any]]:
    """Keys and arguments of :data:`APPLY_SCRIPT`: fold ``events`` and move ``source`` from
    ``expected_position`` to ``new_position`` and ``watermark``.

    ``source`` names an ordered input (``topic:partition`` for Kafka) whose positions are its offsets.
    ``events`` are the on-time events between the two positions (late ones are the caller's, see
    :func:`features.tiles.split_late`). Any client (asyncio, sync, a Flink operator) runs the script with
    these, so every writer keeps the same layout and guarantees.
    """
    deltas = tiles.batch_deltas(view, events)
    keys = [offsets_key(view, namespace)]
    args: list[Any] = [
        source,
        str(expected_position),
        str(new_position),
        str(watermark),
        tiles.retention_ms(view) or 0,
        tiles.tile_retention_ms(view) or 0,
        int(time.time() * 1000),
    ]
    payload = [
        [
            entity_key(view, entity, namespace),
            str(delta.newest_ms),
            str(tiles.first_tile(view, delta.newest_ms)),
            [op for tile, partial in delta.tiles.items() for op in _ops(tile, partial)],
        ]
        for entity, delta in deltas.items()
    ]
    args.append(orjson.dumps(payload))
    return keys, args


def parse_tiles(raw: Mapping[bytes | str, bytes | str]) -> dict[int, dict[str, Any]]:
    """Tiles' partials from an entity hash (distinct counts live in HyperLogLogs, not here)."""
    out: dict[int, dict[str, Any]] = {}
    lasts: dict[tuple[int, str], list[Any]] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        tile_text, sep, slot = key.partition(":")
        if not (sep and tile_text.isdigit()):
            continue
        tile = int(tile_text)
        if slot.startswith("last:"):
            base, _, part = slot.rpartition(":")
            pair = lasts.setdefault((tile, base), [0, None])
            if part == "t":
                pair[0] = int(float(v))
            else:
                pair[1] = orjson.loads(v)
        else:
            out.setdefault(tile, {})[slot] = float(v)
    for (tile, base), (ts, value) in lasts.items():
        out.setdefault(tile, {})[base] = (ts, value)
    return out


def _distinct_fields(view: FeatureView) -> list[str]:
    return sorted({str(a.field) for a in view.aggregations if a.kind == "distinct"})


def row_from_hash(
    view: FeatureView,
    entity: str,
    raw: Mapping[Any, Any],
    now_ms: int,
    distinct: Mapping[str, int] | None = None,
) -> FeatureRow:
    window = view.describe()
    if not raw:
        return FeatureRow(
            entity, view.name, tiles.window_values(view, {}, now_ms), "missing", None, None, window
        )
    newest = int(float(raw.get(b"ts") or raw.get("ts") or 0))
    age = now_ms - newest
    if view.ttl_ms is not None and age > view.ttl_ms:
        return FeatureRow(
            entity, view.name, tiles.window_values(view, {}, now_ms), "expired", newest, age, window
        )
    values = tiles.window_values(view, parse_tiles(raw), now_ms, distinct)
    return FeatureRow(entity, view.name, values, "present", newest, age, window)


class RedisOnlineStore:
    """Reads and writes feature tiles in Redis (asyncio client)."""

    def __init__(self, client: aioredis.Redis, namespace: str = "") -> None:
        self.client = client
        self.namespace = namespace
        self._apply = client.register_script(APPLY_SCRIPT)

    @classmethod
    def from_url(cls, url: str, namespace: str = "") -> RedisOnlineStore:
        return cls(aioredis.Redis.from_url(url), namespace)

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def position(self, view: FeatureView, source: str) -> tuple[int, int]:
        """A source's applied position and watermark (-1, -1 when nothing was applied)."""
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
        """Fold ``events`` and advance ``source`` atomically (see :func:`apply_command`).

        Returns False, writing nothing, if the stored position is not ``expected_position`` (another
        writer moved it): the caller re-reads it and skips what is done.
        """
        keys, args = apply_command(
            view, self.namespace, source, events, expected_position, new_position, watermark
        )
        return int(await self._apply(keys=keys, args=args)) == APPLIED

    async def read_many(
        self, views: Sequence[FeatureView], entities: Sequence[str], now_ms: int | None = None
    ) -> dict[str, list[FeatureRow]]:
        """Current values of many views for many entities, in one round trip."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        async with self.client.pipeline(transaction=False) as pipe:
            for view in views:
                window = tiles.window_tiles(view, now)
                for entity in entities:
                    key = entity_key(view, entity, self.namespace)
                    pipe.hgetall(key)
                    for f in _distinct_fields(view):
                        pipe.pfcount(*(f"{key}:{t}:d:{f}" for t in window))
            results = iter(await pipe.execute())
        out: dict[str, list[FeatureRow]] = {}
        for view in views:
            rows = []
            for entity in entities:
                raw = next(results)
                distinct = {f: int(next(results)) for f in _distinct_fields(view)}
                rows.append(row_from_hash(view, entity, raw, now, distinct))
            out[view.name] = rows
        return out

    async def read(
        self, view: FeatureView, entities: Sequence[str], now_ms: int | None = None
    ) -> list[FeatureRow]:
        """Current values of one view for many entities in one round trip."""
        return (await self.read_many([view], entities, now_ms))[view.name]
