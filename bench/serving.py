"""``make bench-serving``: ``tide serve`` beside its ceiling and beside Feast, in one run.

On a private embedded stack (tansu + Redis on free ports) it fills Redis with online features for E
entities by running the real feature processor over generated events, publishes a model version, and
starts three servers, one worker each, on free ports:

(a) the ceiling: a bare Starlette endpoint under uvicorn (uvloop, httptools, orjson) taking the same
    request and answering a JSON of the same shape (:mod:`bench.serving_ceiling`);
(b) ``tide serve``: validation, the entity's online features from Redis (window merge at read time),
    the model (ONNX when the project can build one, else river; recorded as ``model_flavor``) and the
    prediction log to the predictions topic;
(c) Feast's Python feature server (``feast serve``) with a Redis online store on the same Redis server,
    holding the same values of every online feature the model reads (features only, no scoring;
    :mod:`bench.serving_feast`).

Everything runs the fraud example (``examples/fraud``): its definitions are applied to the benchmark's
namespace first, as ``tide apply`` does.

Load comes from wrk (:mod:`bench.serving_load`): closed-loop maximum throughput (median of ``--reps``
runs, interleaved across targets), then fixed-rate runs at half of each target's own maximum for
latency, and for Tide the same fixed rate twice more per repetition: *steady* (no publishing) and
*swapping* (a new model version published to the models topic once a second). Each Tide run checks that
every answer was 2xx; the swapping run checks that the versions answered changed. Optionally one more
maximum-load run of Tide under py-spy says where its time goes.

Results go to ``out/bench/serving.json``; ``python -m bench.readme`` puts them in README.md.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import serving_setup as su
from bench.serving_load import Target, run_wrk, wrk_path
from bench.serving_profile import PY_SPY, profiled_run
from bench.serving_result import assemble, info_versions, median, print_summary

log = logging.getLogger("bench.serving")

OUT_DIR = Path("out/bench")
RESULT_FILE = OUT_DIR / "serving.json"
PREFIX = "bench-serve-"
SCORE_PATH = f"/v1/models/{su.MODEL}/score"
SWAP_WINDOW_S = 3.0  # quiet and publishing windows alternate at this period within one run
SWAP_GUARD_S = 0.5  # the start of a quiet window right after a publishing one counts in neither


def reproduce_command(args: argparse.Namespace) -> str:
    defaults = {
        "entities": 10_000,
        "events_per_entity": 4,
        "seconds": 10.0,
        "rate_seconds": 15.0,
        "connections": 32,
        "rate_connections": 16,
    }
    extra = "".join(
        f" --{k.replace('_', '-')} {getattr(args, k):g}" for k, v in defaults.items() if getattr(args, k) != v
    )
    extra += (
        " --no-profile" * (not args.profile) + " --river" * args.river + " --skip-feast" * args.skip_feast
    )
    make_args = f' BENCH_ARGS="{extra.strip()}"' if extra else ""
    return (
        f"make bench-serving BENCH_REPS={args.reps}{make_args}"
        f"   # = .venv/bin/python -m bench.serving --reps {args.reps}{extra}"
    )


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    from bench.features import cpu_seconds

    return {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}


def measured(target: Target, pids: dict[str, list[int]], **kwargs: Any) -> dict[str, Any]:
    """One wrk run, with the CPU each process of the stack used during it (cores: 1.0 = one busy core)."""
    c0, t0 = cpu_of(pids), time.perf_counter()
    out = run_wrk(target, **kwargs)
    c1, dt = cpu_of(pids), time.perf_counter() - t0
    out["cpu_cores"] = {k: round((c1[k] - c0[k]) / dt, 2) for k in pids}
    if out["requests"]:  # the server's CPU time per request: less sensitive to what else the machine runs
        out["server_cpu_ms_per_request"] = round(1000 * (c1["server"] - c0["server"]) / out["requests"], 3)
    return out


class SwapDriver(threading.Thread):
    """Alternates windows of ``window_s`` seconds without and with publishing; in a publishing window a
    new model version is published every ``every_s`` seconds from the window's start. ``windows`` records
    ``(start, end, publishing)`` in ``time.monotonic()`` seconds."""

    def __init__(
        self, publisher: su.Publisher, *, window_s: float, first_on: bool, every_s: float = 1.0
    ) -> None:
        super().__init__(daemon=True)
        self.publisher = publisher
        self.window_s = window_s
        self.every_s = every_s
        self.first_on = first_on
        self.stopping = threading.Event()
        self.versions: list[int] = []
        self.windows: list[tuple[float, float, bool]] = []
        self.error: str | None = None

    def run(self) -> None:
        on, start = self.first_on, time.monotonic()
        while not self.stopping.is_set():
            end = start + self.window_s
            due = start
            while on and due < end - 1e-6 and not self.stopping.is_set():
                try:
                    self.versions.append(self.publisher.publish())
                except Exception as exc:  # reported in the result, never hidden
                    self.error = f"{type(exc).__name__}: {exc}"
                    return
                due += self.every_s
                self.stopping.wait(max(0.0, due - time.monotonic()))
            self.stopping.wait(max(0.0, end - time.monotonic()))
            self.windows.append((start, min(end, time.monotonic()), on))
            start, on = end, not on


def split_by_windows(
    samples: list[tuple[float, float, float]], windows: list[tuple[float, float, bool]], guard_s: float
) -> dict[str, dict[str, Any]]:
    """Latency percentiles of the answers that arrived in publishing windows and in the others; answers in
    the first ``guard_s`` of a quiet window that follows a publishing one count in neither (a swap's
    after-effects belong to the swap, not to the steady state)."""
    from bench.serving_load import pct

    groups: dict[str, tuple[list[float], list[float]]] = {"steady": ([], []), "swapping": ([], [])}
    starts = [w[0] for w in windows]
    for at, service, scheduled in samples:
        i = bisect.bisect_right(starts, at) - 1
        if i < 0 or at >= windows[i][1]:
            continue
        start, _, on = windows[i]
        if not on and i > 0 and windows[i - 1][2] and at - start < guard_s:
            continue
        svc, sch = groups["swapping" if on else "steady"]
        svc.append(service)
        sch.append(scheduled)
    out = {}
    for name, (svc, sch) in groups.items():
        svc.sort()
        sch.sort()
        figures = {
            "p50_ms": pct(svc, 50),
            "p99_ms": pct(svc, 99),
            "max_ms": svc[-1] if svc else None,
            "p99_ms_from_schedule": pct(sch, 99),
        }
        out[name] = {"samples": len(svc)} | {k: v if v is None else round(v, 3) for k, v in figures.items()}
    return out


def metrics_text(base: str) -> str:
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        return resp.read().decode()


def swap_metrics(base: str) -> dict[str, float | None]:
    from infra.metrics import metric_value

    text = metrics_text(base)
    return {
        "swaps": metric_value(text, "tide_model_swaps_total", f'model="{su.MODEL}"'),
        "load_failures": metric_value(text, "tide_model_load_failures_total", f'model="{su.MODEL}"'),
        "swap_delay_sum_s": metric_value(text, "tide_model_swap_delay_seconds_sum"),
        "swap_delay_count": metric_value(text, "tide_model_swap_delay_seconds_count"),
    }


def served_version(body: Any) -> int | None:
    """The newest version of the model that GET /v1/models lists as loaded (either shape the endpoint has
    had: one ``version`` per model, or a list of loaded ``versions``)."""
    found: list[int] = []
    for m in (body or {}).get("models", []) if isinstance(body, dict) else []:
        if m.get("name") != su.MODEL:
            continue
        if isinstance(m.get("version"), int):
            found.append(m["version"])
        found += [v["version"] for v in m.get("versions") or [] if isinstance(v.get("version"), int)]
    return max(found, default=None)


def swapping_run(
    target: Target,
    pids: dict[str, list[int]],
    publisher: su.Publisher,
    base: str,
    *,
    window_s: float,
    first_on: bool,
    **kwargs: Any,
) -> dict[str, Any]:
    """One fixed-rate run in alternating quiet and publishing windows (see :class:`SwapDriver`), split by
    window into ``steady`` and ``swapping`` latencies; checks that versions changed and the last one
    published ends up serving."""
    before = swap_metrics(base)
    driver = SwapDriver(publisher, window_s=window_s, first_on=first_on)
    driver.start()
    try:
        out = measured(target, pids, track_versions=True, keep_samples=True, **kwargs)
    finally:
        driver.stopping.set()
        driver.join(10)
    out.update(split_by_windows(out.pop("samples_timed"), driver.windows, guard_s=SWAP_GUARD_S))
    out["windows"] = {"seconds": window_s, "count": len(driver.windows), "first_publishing": first_on}
    last = driver.versions[-1] if driver.versions else None
    served = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the last version published must end up serving
        status, body = su.http("GET", base + "/v1/models")
        served = served_version(body)
        if status == 200 and last is not None and served is not None and served >= last:
            break
        time.sleep(0.2)
    after = swap_metrics(base)
    delta = {k: (after[k] or 0) - (before[k] or 0) for k in after}
    out["swaps"] = {
        "published": len(driver.versions),
        "first_version": driver.versions[0] if driver.versions else None,
        "last_version": last,
        "serving_after": served,
        "versions_answered": len(out.get("versions_seen", {})),
        "swapped_in": delta["swaps"],
        "load_failures": delta["load_failures"],
        "mean_swap_delay_ms": round(1000 * delta["swap_delay_sum_s"] / delta["swap_delay_count"], 1)
        if delta["swap_delay_count"]
        else None,
        "publisher_error": driver.error,
    }
    return out


def bench(args: argparse.Namespace) -> int:
    from bench.features import machine
    from infra.topics import ensure_topics
    from schemas.registry import register_schemas
    from tide.embedded import EmbeddedStack, free_port
    from tide.plan import apply

    problems = []
    if wrk_path() is None:
        problems.append("no wrk on PATH (`apt-get install -y wrk`; `make bench-serving` does it)")
    if not args.skip_feast and not su.FEAST_CLI.exists():
        problems.append("missing .venv-feast: run `make bench-feast-venv` (or pass --skip-feast)")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    run_dir = OUT_DIR / "serving-run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    reproduce = reproduce_command(args)
    print(f"reproduce: {reproduce}", flush=True)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    load_at_start = machine()
    procs: list[subprocess.Popen[bytes]] = []
    project = su.fraud_project()
    with EmbeddedStack(run_dir / "stack") as info:
        settings = info.settings(topic_prefix=PREFIX, project=su.EXAMPLE)
        ensure_topics(settings)
        apply(settings, project)
        register_schemas(project)
        env = {
            "TIDE_KAFKA_BOOTSTRAP": info.kafka_bootstrap,
            "TIDE_REDIS_URL": info.redis_url,
            "TIDE_TOPIC_PREFIX": PREFIX,
            "TIDE_STATE_DIR": str((run_dir / "state").resolve()),
            "TIDE_LOG_LEVEL": "WARNING",
            "TIDE_PROJECT": str(su.EXAMPLE),
        }
        fill = su.fill_features(
            info, settings, env, project, args.entities, args.events_per_entity, 30, run_dir
        )
        print(
            f"features: {fill['events']:,} events over {fill['entities']:,} entities in Redis "
            f"in {fill['seconds']} s",
            flush=True,
        )
        publisher = su.Publisher(settings, project, prefer_onnx=not args.river)
        publisher.publish()
        print(
            f"model: {publisher.flavor} version 1 published"
            + (
                f" (ONNX not available: {publisher.onnx_unavailable_reason})"
                if publisher.onnx_unavailable_reason
                else ""
            ),
            flush=True,
        )
        try:
            tide_port, ceiling_port, feast_port = free_port(), free_port(), free_port()
            tide_proc = su.start_tide(env, tide_port, run_dir)
            procs.append(tide_proc)
            tide_base = f"http://127.0.0.1:{tide_port}"
            sample = {
                "entity": su.entity_id(1),
                "event_id": "probe",
                "features": {"amount": 42.5, "category": "grocery", "country": "US", "card_present": True},
            }
            status, template = su.http("POST", tide_base + SCORE_PATH, sample)
            if status != 200:
                raise RuntimeError(f"tide serve answered {status}: {template}")
            (run_dir / "template.json").write_text(json.dumps(template))
            procs.append(su.start_ceiling(ceiling_port, run_dir / "template.json", run_dir))
            targets = {
                "ceiling": Target("ceiling", f"http://127.0.0.1:{ceiling_port}{SCORE_PATH}", "ceiling"),
                "tide": Target("tide", tide_base + SCORE_PATH, "tide"),
            }
            pids: dict[str, dict[str, list[int]]] = {
                "ceiling": {
                    "server": [procs[-1].pid],
                    "redis": [info.redis_pid],
                    "broker": [info.broker_pid],
                },
                "tide": {"server": [tide_proc.pid], "redis": [info.redis_pid], "broker": [info.broker_pid]},
            }
            feast_setup = None
            if not args.skip_feast:
                values = run_dir / "feast-values.json"
                status_counts = su.feast_values(settings, project, args.entities, values)
                feast_setup = su.setup_feast(info, values, run_dir) | status_counts
                refs = ",".join(f'"{r}"' for r in feast_setup["features"])
                join_key = project.sources[su.SOURCE].key
                body = {"features": feast_setup["features"], "entities": {join_key: [su.entity_id(1)]}}
                feast_proc = su.start_feast(feast_port, run_dir, body)
                procs.append(feast_proc)
                targets["feast"] = Target(
                    "feast", f"http://127.0.0.1:{feast_port}/get-online-features", "feast", refs
                )
                workers = su.children(feast_proc.pid) or [feast_proc.pid]
                pids["feast"] = {"server": workers, "redis": [info.redis_pid], "broker": [info.broker_pid]}
                print(
                    f"feast {feast_setup['versions']['feast']}: {feast_setup['entities']:,} entities "
                    "written, values checked",
                    flush=True,
                )

            common = {"entities": args.entities}
            for target in targets.values():  # warm-up, not measured
                run_wrk(target, mode="max", seconds=3, connections=args.connections, **common)
            max_runs: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
            for rep in range(args.reps):
                for name, target in targets.items():  # interleaved: load drift hits every target alike
                    max_runs[name].append(
                        measured(
                            target,
                            pids[name],
                            mode="max",
                            seconds=args.seconds,
                            connections=args.connections,
                            **common,
                        )
                    )
                print(
                    f"max rep {rep + 1}/{args.reps}: "
                    + ", ".join(
                        f"{k} {v[-1]['rps']:,.0f}/s (server {v[-1]['cpu_cores']['server']} cores)"
                        for k, v in max_runs.items()
                    ),
                    flush=True,
                )
            rps = {k: median(v, "rps") or 0.0 for k, v in max_runs.items()}
            half = {k: 0.5 * v for k, v in rps.items()}
            rate_kw = {
                "mode": "rate",
                "seconds": args.rate_seconds,
                "warmup_s": 2.0,
                "connections": args.rate_connections,
                **common,
            }
            rate_runs: dict[str, list[dict[str, Any]]] = {k: [] for k in [*targets, "tide_swapping"]}
            for rep in range(args.reps):
                for name, target in targets.items():
                    kinds = [name] if name != "tide" else ["tide", "tide_swapping"]
                    for kind in kinds:
                        if kind == "tide_swapping":
                            run = swapping_run(
                                target,
                                pids["tide"],
                                publisher,
                                tide_base,
                                window_s=SWAP_WINDOW_S,
                                first_on=bool(rep % 2),
                                rate=half["tide"],
                                **{**rate_kw, "seconds": 2 * args.rate_seconds},
                            )
                        else:
                            run = measured(
                                target, pids[name], rate=half[name], track_versions=name == "tide", **rate_kw
                            )
                        rate_runs[kind].append(run)
                print(
                    f"rate rep {rep + 1}/{args.reps}: "
                    + ", ".join(
                        f"{k} p99 {v[-1]['p99_ms']} ms at {v[-1]['achieved_rate']:,.0f}/s"
                        for k, v in rate_runs.items()
                        if k != "tide_swapping"
                    )
                    + ", tide p99 quiet/publishing windows {steady[p99_ms]} / {swapping[p99_ms]} ms".format(
                        **rate_runs["tide_swapping"][-1]
                    ),
                    flush=True,
                )
            profile = None
            if args.profile:
                if PY_SPY.exists():
                    profile = profiled_run(
                        tide_proc.pid,
                        lambda: measured(
                            targets["tide"],
                            pids["tide"],
                            mode="max",
                            seconds=args.seconds,
                            connections=args.connections,
                            **common,
                        ),
                    )
                else:
                    print("no py-spy in .venv-bench: skipping the profile (make bench-venv)", file=sys.stderr)
            status, models = su.http("GET", tide_base + "/v1/models")
        finally:
            for proc in reversed(procs):
                su.stop(proc)
            publisher.close()
    result = assemble(
        args,
        reproduce,
        started_at,
        started,
        load_at_start,
        info_versions(feast_setup),
        fill,
        publisher,
        feast_setup,
        rps,
        max_runs,
        rate_runs,
        profile,
        models,
    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_summary(result)
    print(f"wrote {RESULT_FILE}; `.venv/bin/python -m bench.readme` puts it in README.md")
    print(f"reproduce: {reproduce}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each figure (default 3)")
    parser.add_argument("--entities", type=int, default=10_000, help="entities with features (default 10000)")
    parser.add_argument("--events-per-entity", type=int, default=4, help="events per entity (default 4)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="length of a max-throughput run (default 10)"
    )
    parser.add_argument(
        "--rate-seconds", type=float, default=15.0, help="length of a fixed-rate run (default 15)"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="wrk connections at max load (default 32)"
    )
    parser.add_argument(
        "--rate-connections", type=int, default=16, help="connections at fixed rate (default 16)"
    )
    parser.add_argument("--skip-feast", action="store_true", help="leave out the Feast peer")
    parser.add_argument(
        "--river", action="store_true", help="serve the river model even if ONNX is available"
    )
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="no py-spy run of tide serve"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.reps < 1 or args.entities < 2:
        parser.error("--reps must be positive and --entities at least 2")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
