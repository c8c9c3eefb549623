-- Applies folded partials to per-(entity, view version) hashes with exactly-once per key, then moves
-- the view versions' positions forward (features/store.py documents the layout).
--
-- KEYS: the entries' hashes, one per entry in entry order (in cluster mode all of one hash slot), then
--   the positions hashes ARGV[2] names.
-- ARGV[1] header (JSON): {views, runs}
--   views: [[kind (s/t/l), tile ms, window ms, expiry ms ("0": none)]...]
--   runs:  [[view, "@topic:partition", group, entries]...]: consecutive entries of one view version
--     and source partition (the per-key position field); group: the (view version, partition) batch
--     they belong to.
-- ARGV[2] positions (JSON, "" for none): [[key, group, field, position, watermark]...]: moved forward
--   (max) unless an entry of the group conflicted; key indexes KEYS.
-- ARGV[3] the entries, each "\30first last newest n tile\31packed", then "\31tile\31packed" for each
--   further tile (control characters never occur in packed partials). first / last:
--   positions of the first and last record folded into the entry; newest: its newest event time; n:
--   its tiles, never behind the window of newest, one of them holding newest. One argument for all
--   entries: each argument costs the client and the server more than Lua's pattern matching does.
-- Per entry, q = the key's stored position of the source (-1 when none): q >= last: applied already,
-- skipped; q < first: merged, and the key's position becomes last; else (a writer applied part of it)
-- a conflict, nothing written, returned so the caller refolds the key from the records after q.
-- A key the view version never wrote (no position, no "m") takes the entry's values as they are: no
-- parsing, no merge, no table built for the common one-tile entry.
-- Returns {entry number, q, entry number, q...} of the conflicts (entries numbered from 1). Numbers
-- arrive as decimal text and are written back as received or with %d, never with Lua's 14-digit
-- tostring.
local header = cjson.decode(ARGV[1])
local views, runs = header[1], header[2]
local call, gmatch, byte, match, format = redis.call, string.gmatch, string.byte, string.match, string.format
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

-- An entry for a key that holds something already: merge tile by tile, keep the lowest tile, trim
-- tiles behind the window. parts: tile, packed, tile, packed...
local function update(key, v, at, last_s, newest_s, parts, n, old)
  local newest = tonumber(newest_s)
  local kind, tile_ms, window_ms = v[1], v[2], v[3]
  local cutoff = 0
  if kind == 't' then cutoff = newest - newest % tile_ms
  elseif kind == 's' then cutoff = newest - newest % tile_ms - window_ms + tile_ms end
  local lo = nil
  if old[2] then
    local on, ol = match(old[2], '^(%S+) (%S+)$')
    if tonumber(on) > newest then newest_s = on end
    lo = tonumber(ol)
  end
  local out = {at, last_s, 'ts', newest_s}
  for i = 1, n do
    local f = parts[2 * i - 1]
    local tile = tonumber(f)
    out[#out + 1] = f
    out[#out + 1] = merge(old[i + 2], parts[2 * i])
    if lo == nil or tile < lo then lo = tile end
  end
  if lo < cutoff then
    local gone = {}
    for _, f in ipairs(call('HKEYS', key)) do
      if match(f, '^%d+$') and tonumber(f) < cutoff then gone[#gone + 1] = f end
    end
    if #gone > 0 then call('HDEL', key, unpack(gone)) end
    lo = cutoff
  end
  out[#out + 1] = 'm'
  out[#out + 1] = newest_s .. ' ' .. format('%d', lo)
  call('HSET', key, unpack(out))
end

local conflicts, refused = {}, {}
local entries = gmatch(ARGV[3], '\30(%S+) (%S+) (%S+) (%d+) (%d+)\31([^\30]*)')
local k = 0 -- entries so far
for _, run in ipairs(runs) do
  local v, at, group = views[run[1]], run[2], run[3]
  local ttl = v[4]
  for _ = 1, run[4] do
    k = k + 1
    local key = KEYS[k]
    local first, last_s, newest_s, n, tile, rest = entries()
    n = tonumber(n)
    local old, parts
    if n == 1 then
      old = call('HMGET', key, at, 'm', tile)
    else
      parts = {tile}
      for x in gmatch(rest, '[^\31]+') do parts[#parts + 1] = x end
      local fields = {at, 'm'}
      for i = 1, n do fields[i + 2] = parts[2 * i - 1] end
      old = call('HMGET', key, unpack(fields))
    end
    local q = tonumber(old[1]) or -1
    if q < tonumber(first) then
      if old[1] or old[2] then
        update(key, v, at, last_s, newest_s, parts or {tile, rest}, n, old)
      elseif n == 1 then -- new to this view version: the entry as it is (its one tile is the lowest)
        call('HSET', key, at, last_s, 'ts', newest_s, tile, rest, 'm', newest_s .. ' ' .. tile)
      else
        local lo = nil
        local out = {at, last_s, 'ts', newest_s}
        for i = 1, 2 * n, 2 do
          out[#out + 1] = parts[i]
          out[#out + 1] = parts[i + 1]
          local t = tonumber(parts[i])
          if lo == nil or t < lo then lo = t end
        end
        out[#out + 1] = 'm'
        out[#out + 1] = newest_s .. ' ' .. format('%d', lo)
        call('HSET', key, unpack(out))
      end
      if ttl ~= '0' then call('PEXPIRE', key, ttl) end
    elseif q < tonumber(last_s) then
      conflicts[#conflicts + 1] = k
      conflicts[#conflicts + 1] = q
      refused[group] = true
    end
  end
end
if ARGV[2] ~= '' then
  for _, p in ipairs(cjson.decode(ARGV[2])) do
    if not refused[p[2]] then
      local key, f = KEYS[p[1]], p[3]
      local wf = f .. ':wm'
      local cur = call('HMGET', key, f, wf)
      local out = {}
      if not cur[1] or tonumber(cur[1]) < p[4] then out[#out + 1] = f; out[#out + 1] = format('%d', p[4]) end
      if not cur[2] or tonumber(cur[2]) < p[5] then out[#out + 1] = wf; out[#out + 1] = format('%d', p[5]) end
      if #out > 0 then call('HSET', key, unpack(out)) end
    end
  end
end
return conflicts
