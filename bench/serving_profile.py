"""Where ``tide serve``'s time goes: py-spy on the server during one more maximum-load run.

py-spy samples the server process (``--nonblocking``: it is never paused; ``--threads``: each stack is
rooted at its thread) while wrk drives it at maximum load; the raw collapsed stacks are summarised into
shares per thread, per component (the innermost frame that matches a component's patterns) and per
function (own and inclusive samples).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PY_SPY = Path(".venv-bench/bin/py-spy")
PROFILE_FILE = Path("out/bench/serving-profile.txt")


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Own (self) and inclusive sample shares per function, and shares per component (innermost frame
    that matches a component's patterns), from py-spy's raw (collapsed stacks) output."""
    components = (
        ("online features: Redis round trip", ("redis/asyncio", "redis/_parsers", "hiredis")),
        (
            "online features: window merge",
            ("features/tiles.py", "features/aggregations.py", "features/store.py"),
        ),
        ("model predict", ("serving/runtime.py", "onnxruntime", "/river/", "online_training/")),
        ("prediction log (Avro encode + produce)", ("serving/predlog.py", "schemas/codec.py", "fastavro")),
        ("validation", ("serving/validation.py",)),
        ("prometheus metrics", ("prometheus_client",)),
        ("scoring glue (serving/scoring.py, app.py)", ("serving/scoring.py", "serving/app.py", "serving/")),
        ("starlette (routing, request, response)", ("/starlette/",)),
        ("uvicorn + httptools (HTTP protocol)", ("/uvicorn/", "httptools")),
        ("JSON (orjson)", ("orjson",)),
        ("asyncio / uvloop event loop", ("asyncio/", "uvloop")),
    )
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    comp: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith("thread ("):  # py-spy --threads: the root frame names the thread
            name = frames.pop(0).split(": ", 1)[-1]
            threads[name] = threads.get(name, 0) + samples
        if frames:
            self_s[frames[-1]] = self_s.get(frames[-1], 0) + samples
        for f in set(frames):
            incl[f] = incl.get(f, 0) + samples
        label = "other"
        for f in reversed(frames):
            hit = next((lbl for lbl, pats in components if any(p in f for p in pats)), None)
            if hit:
                label = hit
                break
        comp[label] = comp.get(label, 0) + samples

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {
        "samples": total,
        "by_thread_pct": share(threads),
        "by_component_pct": share(comp),
        "self_pct": share(self_s),
        "inclusive_pct": share(incl),
    }


def profiled_run(pid: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()`` (a load run) while py-spy samples process ``pid``; the run's figures and the profile."""
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking"]
    cmd += ["--threads", "--output", str(PROFILE_FILE)]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # py-spy attaches
        figures = run()
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        spy.wait(30)
    return {"run": figures, "file": str(PROFILE_FILE), **summarize_profile(PROFILE_FILE)}
