-- Applies folded partials to per-(entity, view version) hashes with exactly-once per key, then moves
-- the view versions' positions forward (features/store.py documents the layout).
--
-- KEYS: the hashes one call touches (in cluster mode all of one hash slot).
-- ARGV[1] header (JSON): {views, sources}
--   views:   [[kind (s/t/l), tile ms, window ms, expiry ms ("0": none)]...]
--   sources: ["@topic:partition"...], the per-key position fields
-- ARGV[2] entries (JSON): [[key, view, source, first, last, newest, group, tile, packed, tile, packed...]...]
--   key, view, source: 1-based indices into KEYS, views, sources; first / last: positions of the first
--   and last record folded into the entry; newest: its newest event time; group: the (view version,
--   partition) the entry belongs to.
-- ARGV[3] positions (JSON): [[key, group, field, position, watermark]...]: moved forward (max) unless
--   an entry of the group conflicted.
-- Per entry, q = the key's stored position of the source (-1 when none): q >= last: applied already,
-- skipped; q < first: merged, and the key's position becomes last; else (a writer applied part of it)
-- a conflict, nothing written, returned so the caller refolds the key from the records after q.
-- Returns {entry index, q, entry index, q...} of the conflicts. Event times, tiles and positions travel
-- as JSON numbers (exact below 2^53) and are written with %d, never with Lua's 14-digit tostring.
local header = cjson.decode(ARGV[1])
local views, sources = header[1], header[2]
local gmatch, byte, match, format = string.gmatch, string.byte, string.match, string.format
local LINE = '([^=\n]+)=([^\n]*)'
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
  return table.concat(out, '\n')
end
local conflicts, refused = {}, {}
for n, e in ipairs(cjson.decode(ARGV[2])) do
  local key = KEYS[e[1]]
  local v = views[e[2]]
  local at = sources[e[3]]
  local first, last, newest = e[4], e[5], e[6]
  local fields = {at, 'm'}
  for i = 8, #e, 2 do fields[#fields + 1] = format('%d', e[i]) end
  local old = redis.call('HMGET', key, unpack(fields))
  local q = tonumber(old[1]) or -1
  if q < first then
    local kind, tile_ms, window_ms = v[1], v[2], v[3]
    local cutoff = 0
    if kind == 't' then cutoff = newest - newest % tile_ms
    elseif kind == 's' then cutoff = newest - newest % tile_ms - window_ms + tile_ms end
    local newest_s = format('%d', newest)
    local lo = nil
    if old[2] then
      local on, ol = match(old[2], '^(%S+) (%S+)$')
      if tonumber(on) > newest then newest_s = on end
      lo = tonumber(ol)
    end
    local out = {at, format('%d', last), 'ts', newest_s}
    for i = 8, #e, 2 do
      local tile = e[i]
      out[#out + 1] = fields[(i - 8) / 2 + 3]
      out[#out + 1] = merge(old[(i - 8) / 2 + 3], e[i + 1])
      if lo == nil or tile < lo then lo = tile end
    end
    if lo < cutoff then
      local gone = {}
      for _, f in ipairs(redis.call('HKEYS', key)) do
        if match(f, '^%d+$') and tonumber(f) < cutoff then gone[#gone + 1] = f end
      end
      if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
      lo = cutoff
    end
    out[#out + 1] = 'm'
    out[#out + 1] = newest_s .. ' ' .. format('%d', lo)
    redis.call('HSET', key, unpack(out))
    if v[4] ~= '0' then redis.call('PEXPIRE', key, v[4]) end
  elseif q < last then
    conflicts[#conflicts + 1] = n
    conflicts[#conflicts + 1] = q
    refused[e[7]] = true
  end
end
if ARGV[3] then
  for _, p in ipairs(cjson.decode(ARGV[3])) do
    if not refused[p[2]] then
      local key, f = KEYS[p[1]], p[3]
      local wf = f .. ':wm'
      local cur = redis.call('HMGET', key, f, wf)
      local out = {}
      if not cur[1] or tonumber(cur[1]) < p[4] then out[#out + 1] = f; out[#out + 1] = format('%d', p[4]) end
      if not cur[2] or tonumber(cur[2]) < p[5] then out[#out + 1] = wf; out[#out + 1] = format('%d', p[5]) end
      if #out > 0 then redis.call('HSET', key, unpack(out)) end
    end
  end
end
return conflicts
