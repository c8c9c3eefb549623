-- Reads the window of each asked hash (features/store.py documents the layout).
-- KEYS: per-(entity, view version) hashes (in cluster mode all of one hash slot).
-- ARGV[1]: JSON [[first tile, last tile] per key]. Returns per key {meta or false, tile, packed, ...}:
-- only the window's tiles cross the wire.
local out = {}
for i, w in ipairs(cjson.decode(ARGV[1])) do
  local all = redis.call('HGETALL', KEYS[i])
  local lo, hi = w[1], w[2]
  local row = {false}
  for k = 1, #all, 2 do
    local f = all[k]
    if f == 'm' then
      row[1] = all[k + 1]
    else
      local t = tonumber(f)
      if t and t >= lo and t <= hi and string.match(f, '^%d+$') then
        row[#row + 1] = f
        row[#row + 1] = all[k + 1]
      end
    end
  end
  out[i] = row
end
return out
