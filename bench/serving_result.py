"""The result of ``make bench-serving``: medians, ratios and goals, what each figure means, the summary."""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import serving_setup as su
from bench.serving_load import wrk_version

GOALS = {"vs_ceiling": 0.4, "p99_ms_half_load": 5.0, "vs_feast": 2.0, "swap_p99_ratio": 1.5}


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def info_versions(feast_setup: dict[str, Any] | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version(), "wrk": wrk_version()}
    for dist in (
        "tide-ml",
        "uvicorn",
        "starlette",
        "uvloop",
        "httptools",
        "orjson",
        "redis",
        "onnxruntime",
        "river",
        "confluent-kafka",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "-uno"], capture_output=True, text=True
    ).stdout.strip()
    out["git"] = commit + ("+dirty" if dirty else "")
    if feast_setup:
        out.update(feast_setup["versions"])
    return out


def assemble(
    args: argparse.Namespace,
    reproduce: str,
    started_at: str,
    started: float,
    machine: dict[str, Any],
    versions: dict[str, Any],
    fill: dict[str, Any],
    publisher: su.Publisher,
    feast_setup: dict[str, Any] | None,
    rps: dict[str, float],
    max_runs: dict[str, list[dict[str, Any]]],
    rate_runs: dict[str, list[dict[str, Any]]],
    profile: dict[str, Any] | None,
    models: Any,
) -> dict[str, Any]:
    tide, ceiling, feast = rps["tide"], rps["ceiling"], rps.get("feast")
    half, swap_runs = rate_runs["tide"], rate_runs["tide_swapping"]
    steady = [r["steady"] for r in swap_runs]  # the quiet windows of the swap runs
    swapping = [r["swapping"] for r in swap_runs]  # their publishing windows
    p99_half = median(half, "p99_ms")
    p99_steady = median(steady, "p99_ms")
    p99_swap = median(swapping, "p99_ms")
    feast_p99 = median(rate_runs["feast"], "p99_ms") if feast else None
    non_2xx = sum(r["non_2xx"] for k in ("tide", "tide_swapping") for r in rate_runs[k]) + sum(
        r["non_2xx"] + sum(v for e, v in r["errors"].items() if e != "status_over_399")
        for r in max_runs["tide"]
    )
    versions_changed = all(
        (r["swaps"]["versions_answered"] or 0) >= 2
        and r["swaps"]["serving_after"] == r["swaps"]["last_version"]
        for r in swap_runs
    )
    ratios = {
        "vs_ceiling": round(tide / ceiling, 3) if ceiling else None,
        "vs_feast": round(tide / feast, 2) if feast else None,
        "swap_p99_ratio": round(p99_swap / p99_steady, 2) if p99_steady and p99_swap else None,
        # per run (its publishing windows over its quiet ones), median of reps
        "swap_p99_ratio_per_run": round(
            statistics.median(w["p99_ms"] / q["p99_ms"] for q, w in zip(steady, swapping, strict=True)), 2
        )
        if swapping and all(q["p99_ms"] and w["p99_ms"] for q, w in zip(steady, swapping, strict=True))
        else None,
        "p99_vs_feast": round(p99_half / feast_p99, 2) if p99_half and feast_p99 else None,
        "feast_vs_ceiling": round(feast / ceiling, 3) if feast and ceiling else None,
    }
    goals_met = {
        "vs_ceiling": bool(ratios["vs_ceiling"] and ratios["vs_ceiling"] >= GOALS["vs_ceiling"]),
        "p99_ms_half_load": bool(p99_half is not None and p99_half < GOALS["p99_ms_half_load"]),
        "vs_feast": bool(
            ratios["vs_feast"]
            and ratios["vs_feast"] >= GOALS["vs_feast"]
            and p99_half is not None
            and feast_p99 is not None
            and p99_half < feast_p99
        ),
        "swap_p99_ratio": bool(
            ratios["swap_p99_ratio"] and ratios["swap_p99_ratio"] <= GOALS["swap_p99_ratio"]
        ),
        "all_2xx": non_2xx == 0,
        "versions_changed": versions_changed,
    }
    return {
        "benchmark": "serving",
        "measured_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reproduce": reproduce,
        "rps": tide,
        "ceiling_rps": ceiling,
        "feast_rps": feast,
        "p50_ms_half_load": median(half, "p50_ms"),
        "p99_ms_half_load": p99_half,
        "p99_ms_steady": p99_steady,
        "p99_ms_swapping": p99_swap,
        "p99_ms_half_load_from_schedule": median(half, "p99_ms_from_schedule"),
        "p99_ms_swapping_from_schedule": median(swapping, "p99_ms_from_schedule"),
        "feast_p50_ms_half_load": median(rate_runs["feast"], "p50_ms") if feast else None,
        "feast_p99_ms_half_load": feast_p99,
        "ceiling_p99_ms_half_load": median(rate_runs["ceiling"], "p99_ms"),
        "half_load_rps": {k: round(v / 2, 1) for k, v in rps.items()},
        "server_cpu_ms_per_request": {k: median(v, "server_cpu_ms_per_request") for k, v in max_runs.items()},
        "non_2xx_tide": non_2xx,
        "ratios": ratios,
        "goals": GOALS,
        "goals_met": goals_met,
        "definitions": DEFINITIONS,
        "model_flavor": publisher.flavor,
        "onnx_unavailable": publisher.onnx_unavailable_reason,
        "models_after": models,
        "workers": 1,
        "reps": args.reps,
        "entities": args.entities,
        "features": fill,
        "feast": feast_setup,
        "load": {
            "max": {"connections": args.connections, "threads": 2, "seconds": args.seconds},
            "rate": {"connections": args.rate_connections, "seconds": args.rate_seconds, "warmup_s": 2.0},
            "swap_test": {"seconds": 2 * args.rate_seconds, "window_s": 3.0, "guard_s": 0.5},
        },
        "runs": {"max": max_runs, "rate": rate_runs},
        "profile": profile,
        "machine": machine,
        "versions": versions,
        "wall_s": round(time.perf_counter() - started, 1),
    }


DEFINITIONS = {
    "rps": "tide serve, 1 worker: closed-loop maximum requests/s (wrk, max connections), median of reps",
    "p99_ms_half_load": "service-time p99 at a fixed rate of half of rps (one connection per wrk thread, "
    "paced by delay()); median of reps",
    "p99_ms_steady": "swap test: one fixed-rate run at the p99_ms_half_load rate, twice as long, in which "
    "quiet windows and publishing windows of 3 s alternate; p99 of the answers that arrived in the quiet "
    "windows (the first 0.5 s after a publishing window left out), median of reps",
    "p99_ms_swapping": "the same runs' publishing windows: a new model version is published to the models "
    "topic at the start of each second (the follower loads, warms it up and swaps it in); median of reps",
    "swap_p99_ratio": "p99_ms_swapping / p99_ms_steady; swap_p99_ratio_per_run is the median of the ratio "
    "taken within each run",
    "_from_schedule": "latency from the time a request was due on the schedule (coordinated omission "
    "corrected, as wrk2 does; includes up to ~1 ms of wrk's timer resolution)",
    "feast_p99_ms_half_load": "Feast's p99 at half of Feast's own maximum",
}


def print_summary(r: dict[str, Any]) -> None:
    ratio, met = r["ratios"], r["goals_met"]
    yes = {True: "met", False: "NOT met"}
    print(
        f"\nserving benchmark: {r['entities']:,} entities, model {r['model_flavor']}, "
        f"median of {r['reps']}, 1 worker each"
    )
    print(
        f"  ceiling (bare starlette)   {r['ceiling_rps']:>10,.0f} req/s  "
        f"p99 {r['ceiling_p99_ms_half_load']} ms at half load"
    )
    print(
        f"  tide serve                 {r['rps']:>10,.0f} req/s  {ratio['vs_ceiling']}x ceiling "
        f"(goal >= 0.4: {yes[met['vs_ceiling']]})"
    )
    if r["feast_rps"]:
        print(
            f"  feast serve (features)     {r['feast_rps']:>10,.0f} req/s  tide/feast {ratio['vs_feast']}x "
            f"(goal >= 2x at lower p99: {yes[met['vs_feast']]}); "
            f"feast p99 {r['feast_p99_ms_half_load']} ms at its half load"
        )
    print(
        f"  tide p50/p99 at half load  {r['p50_ms_half_load']} / {r['p99_ms_half_load']} ms "
        f"(goal p99 < 5: {yes[met['p99_ms_half_load']]})"
    )
    print(
        f"  tide p99 steady/swapping   {r['p99_ms_steady']} / {r['p99_ms_swapping']} ms "
        f"= {ratio['swap_p99_ratio']}x "
        f"(goal <= 1.5: {yes[met['swap_p99_ratio']]})"
    )
    print(f"  tide non-2xx: {r['non_2xx_tide']}; versions changed while swapping: {met['versions_changed']}")
    if r.get("profile"):
        print("  profile of tide serve at max load (share of samples by component):")
        for name, pct in r["profile"]["by_component_pct"]:
            print(f"    {pct:5.1f}%  {name}")
