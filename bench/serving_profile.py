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

from bench import profiles

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
        ("model predict", ("models/runtime.py", "onnxruntime", "/river/", "online_training/")),
        ("prediction log (Avro encode + produce)", ("serving/predlog.py", "schemas/codec.py", "fastavro")),
        ("validation", ("serving/validation.py",)),
        ("prometheus metrics", ("prometheus_client",)),
        ("scoring glue (serving/scoring.py, app.py)", ("serving/scoring.py", "serving/app.py", "serving/")),
        ("starlette (routing, request, response)", ("/starlette/",)),
        ("uvicorn + httptools (HTTP protocol)", ("/uvicorn/", "httptools")),
        ("JSON (orjson)", ("orjson",)),
        ("asyncio / uvloop event loop", ("asyncio/", "uvloop")),
    )
    return profiles.summarize(path, components, top)


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
