"""The Redis online store: per-entity tile hashes, written atomically with the source offsets.

Layout (one hash per entity and view; one hash of applied offsets per view)::

    {ns}tide:f:{view}:{entity}   {tile}:n -> count, {tile}:s:{field} -> sum, ts -> newest event time,
                             seen -> wall time of the last write, lo -> lowest tile kept
    {ns}tide:f:{view}:offsets    {topic}:{partition} -> last applied source offset

``ns`` is the deployment's namespace (its topic prefix), so several deployments can share one Redis.

A batch is applied by one Lua script that checks the partition's stored offset, adds the partials and
advances the offset in one atomic step. Records at or below the stored offset are skipped before the
call, so a replay after a crash or a rebalance never counts an event twice (exactly-once effect on top
of at-least-once delivery).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from features import tiles
from features.definitions import FeatureView

APPLY_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or '-1'
if cur ~= ARGV[2] then return tonumber(cur) end
local ttl, now, i = ARGV[4], ARGV[5], 6
for k = 2, #KEYS do
  local key = KEYS[k]
  local ts, cutoff, nf = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  local lo = nil
  for j = 1, nf do
    redis.call('HINCRBYFLOAT', key, ARGV[i], ARGV[i + 1])
    local t = tonumber(string.match(ARGV[i], '^(%d+):'))
    if lo == nil or t < lo then lo = t end
    i = i + 2
  end
  local old_ts = tonumber(redis.call('HGET', key, 'ts') or '0')
  if ts > old_ts then redis.call('HSET', key, 'ts', ts) end
  local old_lo = tonumber(redis.call('HGET', key, 'lo') or '-1')
  if old_lo >= 0 and old_lo < lo then lo = old_lo end
  if lo < cutoff then
    for _, f in ipairs(redis.call('HKEYS', key)) do
      local t = tonumber(string.match(f, '^(%d+):'))
      if t and t < cutoff then redis.call('HDEL', key, f) end
    end
    lo = cutoff
  end
  redis.call('HSET', key, 'lo', lo, 'seen', now)
  redis.call('PEXPIRE', key, ttl)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return -2
"""
APPLIED = -2  # what APPLY_SCRIPT returns on success (otherwise: the stored position)

Status = Literal["present", "missing", "expired"]


@dataclass(frozen=True)
class FeatureRow:
    """One entity's feature values from one view, with where they stand in time."""

    entity: str
    values: dict[str, float]
    status: Status
    newest_event_ms: int | None  # event time of the newest event in the store for this entity
    age_ms: int | None  # now - newest_event_ms

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "values": self.values,
            "status": self.status,
            "newest_event_ms": self.newest_event_ms,
            "age_ms": self.age_ms,
        }


def entity_key(view: FeatureView, entity: str, namespace: str = "") -> str:
    return f"{namespace}tide:f:{view.name}:{entity}"


def offsets_key(view: FeatureView, namespace: str = "") -> str:
    return f"{namespace}tide:f:{view.name}:offsets"


def apply_command(
    view: FeatureView,
    namespace: str,
    source: str,
    records: Sequence[tuple[int, Mapping[str, Any]]],
    expected_position: int,
) -> tuple[list[str], list[Any], int] | None:
    """Keys and arguments of :data:`APPLY_SCRIPT` for ``(position, event)`` records of one ``source``.

    ``source`` names an ordered input (``topic:partition`` for Kafka); positions are its offsets. Records
    at or below ``expected_position`` are left out; None when nothing is left. Any client (asyncio, sync,
    a Flink operator) runs the script with these, so every writer keeps the same layout and guarantees.
    """
    fresh = [(o, e) for o, e in records if o > expected_position]
    if not fresh:
        return None
    new_position = max(o for o, _ in fresh)
    deltas = tiles.batch_deltas(view, (e for _, e in fresh))
    keys = [offsets_key(view, namespace)]
    args: list[Any] = [
        source,
        str(expected_position),
        str(new_position),
        view.window_ms + 2 * view.tile_ms,
        int(time.time() * 1000),
    ]
    for entity, delta in deltas.items():
        keys.append(entity_key(view, entity, namespace))
        fields = [(f"{t}:{k}", v) for t, p in delta.tiles.items() for k, v in p.items()]
        args += [delta.newest_ms, tiles.first_tile(view, delta.newest_ms), len(fields)]
        for name, value in fields:
            args += [name, repr(value)]
    return keys, args, new_position


def parse_tiles(raw: Mapping[bytes | str, bytes | str]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        tile, sep, part = key.partition(":")
        if sep and tile.isdigit():
            out.setdefault(int(tile), {})[part] = float(v)
    return out


def row_from_hash(view: FeatureView, entity: str, raw: Mapping[Any, Any], now_ms: int) -> FeatureRow:
    if not raw:
        return FeatureRow(entity, tiles.values(view, {}), "missing", None, None)
    newest = int(float(raw.get(b"ts") or raw.get("ts") or 0))
    merged_tiles = parse_tiles(raw)
    in_window = tiles.window_values(view, merged_tiles, now_ms)
    expired = newest < tiles.first_tile(view, now_ms)
    return FeatureRow(entity, in_window, "expired" if expired else "present", newest, now_ms - newest)


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

    async def applied_offset(self, view: FeatureView, topic: str, partition: int) -> int:
        raw = await self.client.hget(offsets_key(view, self.namespace), f"{topic}:{partition}")
        return int(raw) if raw is not None else -1

    async def apply(
        self,
        view: FeatureView,
        topic: str,
        partition: int,
        records: Sequence[tuple[int, Mapping[str, Any]]],
        expected_offset: int,
    ) -> int:
        """Apply ``(offset, event)`` records above ``expected_offset`` atomically.

        Returns the partition's applied offset afterwards. If another writer moved the offset meanwhile,
        nothing is written and the stored offset is returned so the caller can skip what is done.
        """
        command = apply_command(view, self.namespace, f"{topic}:{partition}", records, expected_offset)
        if command is None:
            return expected_offset
        keys, args, new_offset = command
        result = int(await self._apply(keys=keys, args=args))
        return new_offset if result == APPLIED else result

    async def read(
        self, view: FeatureView, entities: Sequence[str], now_ms: int | None = None
    ) -> list[FeatureRow]:
        """Current values for many entities in one round trip."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        async with self.client.pipeline(transaction=False) as pipe:
            for entity in entities:
                pipe.hgetall(entity_key(view, entity, self.namespace))
            raws = await pipe.execute()
        return [row_from_hash(view, e, raw, now) for e, raw in zip(entities, raws, strict=True)]
