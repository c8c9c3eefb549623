-- Records a view version's progress and state in the views hash (features/versions.py).
-- KEYS[1]: the views hash. ARGV: view ref, JSON progress {"topic:partition": [position, target]...},
-- partitions of its source (it is live once that many have reached their target), now (ms), and
-- "retire" to retire it. A retired version stays retired; a live one never goes back to backfilling.
-- Returns the state after the update.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local doc
if raw then doc = cjson.decode(raw) else doc = {state = 'backfilling', ts = tonumber(ARGV[4])} end
if doc.state == 'retired' then return 'retired' end
if type(doc.progress) ~= 'table' then doc.progress = {} end
for p, v in pairs(cjson.decode(ARGV[2])) do doc.progress[p] = v end
if ARGV[5] == 'retire' then
  doc.state = 'retired'
  doc.ts = tonumber(ARGV[4])
elseif doc.state ~= 'live' then
  local n, caught = 0, true
  for _, v in pairs(doc.progress) do
    n = n + 1
    if v[1] < v[2] then caught = false end
  end
  if caught and n >= tonumber(ARGV[3]) then
    doc.state = 'live'
    doc.ts = tonumber(ARGV[4])
  end
end
if next(doc.progress) == nil then doc.progress = nil end
local out = cjson.encode(doc)
redis.call('HSET', KEYS[1], ARGV[1], out)
return doc.state
