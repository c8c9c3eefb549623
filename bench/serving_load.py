"""Load generation for ``make bench-serving``: wrk with a Lua script, closed-loop or at a fixed rate.

Two modes, one script (:data:`LUA`):

- ``max``: closed loop, every connection sends its next request as soon as the previous answer arrived
  (wrk's own loop); the figure is requests per second. Status codes above 399 and socket errors are
  wrk's own counters.
- ``rate``: one connection per wrk thread, each sending on a fixed schedule (``rate / connections`` per
  second, phases spread evenly across connections) by returning the time to its next slot from wrk's
  ``delay()``. Every response is timed in Lua with a monotonic clock (LuaJIT ffi ``clock_gettime``):
  *service time* (from the moment the request was written) and *time from schedule* (from the slot it
  was due, when it went out late). The second corrects for coordinated omission the way wrk2 does;
  ``late_sends`` counts requests that left more than 2 ms after their slot (wrk's timers have 1 ms
  resolution, so up to ~1 ms of lateness is the timer, not the server). Every status is counted, and
  for Tide the ``version`` of each answer.

Bodies vary per request: a random entity among the ``entities`` that have features, a random amount,
category and country (Tide and the ceiling), or the Feast feature-server request for that entity.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# wrk reads the script; run-specific values come in as script arguments (init(args)).
LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local tsbuf = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, tsbuf)  -- CLOCK_MONOTONIC
  return tonumber(tsbuf.tv_sec) * 1000000 + tonumber(tsbuf.tv_nsec) / 1000
end

local threads = {}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

local CATEGORIES = {"grocery", "travel", "electronics", "restaurants", "fuel", "online"}
local COUNTRIES = {"US", "US", "US", "GB", "FR", "DE"}
local HEADERS = {["Content-Type"] = "application/json"}
local TIDE_FMT = '{"entity":"card-%06d","event_id":"bench-%d-%d","features":{"amount":%.2f,' ..
  '"category":"%s","country":"%s","card_present":%s}}'
local FEAST_FMT = '{"features":[%s],"entities":{"card_id":["card-%06d"]}}'

local kind, path, entities, feast_features
local interval, slot, sent_at, intended, warm_until, track
local seq = 0
n = 0
lat = {}
sched = {}
at = {}
statuses = {}
versions = {}
late = 0

function init(args)
  local mode = args[1]
  kind = args[2]
  path = args[3]
  entities = tonumber(args[4])
  local rate = tonumber(args[5])  -- requests per second per connection (rate mode)
  local warm = tonumber(args[6])
  local nthreads = tonumber(args[7])
  track = args[8] == "1"
  feast_features = args[9]
  math.randomseed(tid * 7919 + math.floor(now_us()) % 100000)
  local t0 = now_us()
  warm_until = t0 + warm * 1000000
  if mode == "rate" then
    interval = 1000000 / rate
    slot = t0 + ((tid - 1) / nthreads) * interval
    intended = slot
    delay = rate_delay
    response = rate_response
  end
end

function request()
  seq = seq + 1
  local e = math.random(0, entities - 1)
  local body
  if kind == "feast" then
    body = string.format(FEAST_FMT, feast_features, e)
  else
    body = string.format(TIDE_FMT, e, tid, seq, math.random(100, 50000) / 100,
      CATEGORIES[math.random(1, #CATEGORIES)], COUNTRIES[math.random(1, #COUNTRIES)],
      math.random() < 0.7 and "true" or "false")
  end
  sent_at = now_us()
  if interval and sent_at - intended > 2000 then late = late + 1 end
  return wrk.format("POST", path, HEADERS, body)
end

function rate_delay()
  slot = slot + interval
  intended = slot
  local d = (slot - now_us()) / 1000
  if d <= 0 then return 0 end
  return math.floor(d)
end

function rate_response(status, headers, body)
  local t = now_us()
  statuses[status] = (statuses[status] or 0) + 1
  if t >= warm_until then
    n = n + 1
    lat[n] = t - sent_at
    sched[n] = t - math.min(sent_at, intended)
    at[n] = t
  end
  if track then
    local v = string.match(body, '"version":(%d+)')
    if v then versions[v] = (versions[v] or 0) + 1 end
  end
end

function done(summary, latency, requests)
  local out = io.open(os.getenv("BENCH_WRK_OUT"), "w")
  out:write(string.format("requests %d\nduration_us %d\n", summary.requests, summary.duration))
  local e = summary.errors
  out:write(string.format("errors %d %d %d %d %d\n", e.connect, e.read, e.write, e.status, e.timeout))
  for _, p in ipairs({50, 90, 99, 99.9}) do
    out:write(string.format("wrk_latency %g %d\n", p, latency:percentile(p)))
  end
  out:write(string.format("wrk_latency_max %d\n", latency.max))
  for _, thread in ipairs(threads) do
    local k = thread:get("n")
    local ls, ss, ts = thread:get("lat"), thread:get("sched"), thread:get("at")
    for i = 1, k do out:write(string.format("s %.1f %.1f %.0f\n", ls[i], ss[i], ts[i])) end
    for code, c in pairs(thread:get("statuses")) do out:write(string.format("status %d %d\n", code, c)) end
    for v, c in pairs(thread:get("versions")) do out:write(string.format("version %s %d\n", v, c)) end
    out:write(string.format("late %d\n", thread:get("late")))
  end
  out:close()
end
"""


@dataclass(frozen=True)
class Target:
    """What a load run hits: the URL and which request bodies it takes."""

    name: str
    url: str  # full URL of the POST endpoint
    kind: str  # "tide" | "ceiling" | "feast"
    feast_features: str = ""  # the quoted, comma-separated feature references of a Feast request


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    proc = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    match = re.search(r"wrk (\S+)", proc.stdout + proc.stderr)
    return match.group(1) if match else "?"


def pct(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


def run_wrk(
    target: Target,
    *,
    mode: str,
    seconds: float,
    entities: int,
    connections: int,
    threads: int = 2,
    rate: float = 0.0,
    warmup_s: float = 0.0,
    track_versions: bool = False,
    timeout_s: float = 2.0,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """One wrk run against ``target``; returns its figures (see the module docstring).

    With ``keep_samples`` (rate mode) the result also holds ``samples``: one ``(answered_at, service_ms,
    from_schedule_ms)`` per answer after the warm-up, ``answered_at`` in ``time.monotonic()`` seconds
    (the script's clock is CLOCK_MONOTONIC too), to split a run by time windows.
    """
    if mode == "rate":
        threads = connections  # one connection per thread: its responses come back in its own order
    total_s = seconds + warmup_s
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "load.lua"
        script.write_text(LUA)
        out_file = Path(tmp) / "out.txt"
        args = [
            mode, target.kind, "/" + target.url.split("/", 3)[3], str(entities),
            f"{rate / connections if mode == 'rate' else 0:.6f}", f"{warmup_s:g}", str(threads),
            "1" if track_versions else "0", target.feast_features or "-",
        ]  # fmt: skip
        cmd = [
            "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{math.ceil(total_s)}s",
            "--timeout", f"{timeout_s:g}s", "-s", str(script), target.url, "--", *args,
        ]  # fmt: skip
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=total_s + 60,
            env={**os.environ, "BENCH_WRK_OUT": str(out_file)},
        )
        if proc.returncode != 0 or not out_file.exists():
            raise RuntimeError(
                f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout[-2000:]}"
            )
        result = parse(out_file.read_text(), mode=mode, seconds=seconds, keep_samples=keep_samples)
    result.update({"mode": mode, "target": target.name, "connections": connections, "threads": threads})
    if mode == "rate":
        result["target_rate"] = round(rate, 1)
    return result


def parse(text: str, *, mode: str, seconds: float, keep_samples: bool = False) -> dict[str, Any]:
    service: list[float] = []
    scheduled: list[float] = []
    timed: list[tuple[float, float, float]] = []
    statuses: dict[int, int] = {}
    versions: dict[int, int] = {}
    wrk_lat: dict[str, float] = {}
    out: dict[str, Any] = {"late_sends": 0}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        head = parts[0]
        if head == "s":
            service.append(float(parts[1]) / 1000)
            scheduled.append(float(parts[2]) / 1000)
            if keep_samples:
                timed.append((float(parts[3]) / 1e6, service[-1], scheduled[-1]))
        elif head == "status":
            statuses[int(parts[1])] = statuses.get(int(parts[1]), 0) + int(parts[2])
        elif head == "version":
            versions[int(parts[1])] = versions.get(int(parts[1]), 0) + int(parts[2])
        elif head == "late":
            out["late_sends"] += int(parts[1])
        elif head == "requests":
            out["requests"] = int(parts[1])
        elif head == "duration_us":
            out["duration_s"] = int(parts[1]) / 1e6
        elif head == "errors":
            keys = ("connect", "read", "write", "status_over_399", "timeout")
            out["errors"] = dict(zip(keys, map(int, parts[1:]), strict=True))
        elif head == "wrk_latency":
            wrk_lat[f"p{parts[1]}"] = round(int(parts[2]) / 1000, 3)
        elif head == "wrk_latency_max":
            wrk_lat["max"] = round(int(parts[1]) / 1000, 3)
    out["rps"] = round(out["requests"] / out["duration_s"], 1)
    out["wrk_latency_ms"] = wrk_lat
    if mode == "rate":
        service.sort()
        scheduled.sort()
        non_2xx = sum(c for code, c in statuses.items() if not 200 <= code < 300)
        out.update(
            {
                "samples": len(service),
                "achieved_rate": round(len(service) / seconds, 1),
                "p50_ms": _r(pct(service, 50)),
                "p90_ms": _r(pct(service, 90)),
                "p99_ms": _r(pct(service, 99)),
                "p999_ms": _r(pct(service, 99.9)),
                "max_ms": _r(service[-1] if service else None),
                "p50_ms_from_schedule": _r(pct(scheduled, 50)),
                "p99_ms_from_schedule": _r(pct(scheduled, 99)),
                "max_ms_from_schedule": _r(scheduled[-1] if scheduled else None),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "responses": sum(statuses.values()),
                "non_2xx": non_2xx,
            }
        )
        if versions:
            out["versions_seen"] = {str(k): v for k, v in sorted(versions.items())}
        if keep_samples:
            out["samples_timed"] = timed
    else:
        out["non_2xx"] = out["errors"]["status_over_399"]
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
