"""``python -m bench.readme``: rewrite the benchmark section of README.md from ``out/bench/*.json``.

Each benchmark has its block between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``
(``features``, ``serving``, ``learn``, ``drift``, ``canary``: ``out/bench/<name>.json``); only the text
between a block's markers is replaced, and a block whose result file is missing is left as it is
(a block never rendered yet gets a placeholder). Missing markers are inserted at the end of the
"## Performance" section. Nothing else in README.md is touched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

START, END = "<!-- bench:features:start -->", "<!-- bench:features:end -->"
SECTION = "## Performance"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _x(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}x" if value < 0.1 else f"{value:.2f}x"


def render_features(r: dict[str, Any]) -> str:
    """The README block for ``out/bench/features.json``."""
    ratio, fresh, m = r["ratios"], r["freshness"], r["machine"]
    met = {k: "met" if v else "**not met**" for k, v in r["goals_met"].items()}
    views = ", ".join(
        f"`{d['name']}` ({d.get('kind', 'sliding')}, {len(d['features'])} aggregations)"
        for d in r["definitions"]
    )
    quix = r["versions"].get("quixstreams")
    lines = [
        f"Feature processor, `make bench-features` ({r['measured_at'][:10]}, {m['cpu_model']}, "
        f"{m['nproc']} cores, commit `{r['versions'].get('git')}`): {r['N']:,} events over "
        f"{r['entities']:,} entities on one {r['partitions']}-partition topic of the embedded broker; "
        f"views {views}; throughput is the median of {r['reps']} runs, one worker process each.",
        "",
        "| measure | events/s | compared with | ratio | goal |",
        "|---|---:|---|---:|---|",
        f"| ceiling: bare confluent-kafka consume | {_n(r['ceiling_events_per_s'])} | | | |",
        f"| ceiling: consume + Avro decode | {_n(r['ceiling_decode_events_per_s'])} | | | |",
        f"| **Tide** `tide features`, 1 process | **{_n(r['events_per_s'])}** | decode ceiling | "
        f"{_x(ratio['tide_vs_ceiling_decode'])} | ≥ 50,000/s: {met['events_per_s']} |",
        f"| Quix Streams {quix or ''}, same views, 1 process | {_n(r['quix_events_per_s'])} | Tide | "
        f"Tide {_x(ratio['tide_vs_quix'])} | Tide ≥ 2x: {met['vs_quix']} |",
        "",
        f"Freshness (event time → visible in Redis) with events produced at {_n(fresh['achieved_rate'])}/s "
        f"(half of Tide's throughput): p50 **{_n(fresh['p50'])} ms**, p99 "
        f"**{_n(fresh['p99'])} ms** ({fresh['samples']:,} samples; "
        f"goal p99 < 300 ms: {met['freshness_p99_ms']}).",
        "",
        "Semantics differ where the engines do: Tide merges per-tile partials at read time and applies "
        "each batch in Redis exactly once per key (positions kept with the state, readable by serving); "
        "Quix computes each window per event in its own RocksDB store, at-least-once, without a sink. "
        "Details, the profile and how to read the figures: "
        "[`docs/2026-11-21-bench-features.md`](docs/2026-11-21-bench-features.md).",
        "",
        f"Reproduce: `{r['reproduce'].split('   #')[0]}` (raw results: `out/bench/features.json`).",
    ]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _far(ratio: float | None, goal: float, higher_is_better: bool) -> str:
    """How far a measured ratio is from its goal, in words."""
    if ratio is None or ratio <= 0:
        return "not measured"
    if (ratio >= goal) if higher_is_better else (ratio <= goal):
        return "met"
    return f"{goal / ratio:.1f}x short" if higher_is_better else f"{ratio / goal:.1f}x over"


def render_serving(r: dict[str, Any]) -> str:
    """The README block for ``out/bench/serving.json``."""
    ratio, m, g, v = r["ratios"], r["machine"], r["goals"], r["versions"]
    met = {k: "met" if ok else "**not met**" for k, ok in r["goals_met"].items()}
    half = r["half_load_rps"]
    load = r["load"]
    cpu = r.get("server_cpu_ms_per_request") or {}
    swaps = [run["swaps"] for run in r["runs"]["rate"]["tide_swapping"]]
    published = sum(s["published"] for s in swaps)
    answered = min((s["versions_answered"] for s in swaps), default=0)
    delays = [s["mean_swap_delay_ms"] for s in swaps if s.get("mean_swap_delay_ms") is not None]
    feast = v.get("feast")
    flavor = r["model_flavor"]
    lines = [
        f"Scoring service, `make bench-serving` ({r['measured_at'][:10]}, {m['cpu_model']}, "
        f"{m['nproc']} cores "
        f"shared with wrk, Redis and the broker, commit `{v.get('git')}`): one worker per server; "
        f"{r['entities']:,} cards with the online features the fraud model reads (11 features of 3 views, "
        f"merged from their tiles at read time, one Redis script call); the model is "
        f"{'an ONNX MLP' if flavor == 'onnx' else 'the river model'} (`{flavor}`); "
        f"every prediction is logged to the `predictions` topic. Throughput: wrk closed loop, "
        f"{load['max']['connections']} connections, median of {r['reps']} runs of "
        f"{load['max']['seconds']:g} s, "
        f"interleaved. Latency: a fixed rate of half of each server's own maximum, "
        f"{load['rate']['connections']} connections, {load['rate']['seconds']:g} s runs; the swap test runs "
        f"at Tide's half load for {load['swap_test']['seconds']:g} s, alternating "
        f"{load['swap_test']['window_s']:g} s windows without and with publishing.",
        "",
        "| measure | value | compared with | ratio | goal |",
        "|---|---:|---|---:|---|",
        f"| ceiling: bare Starlette endpoint (uvicorn, uvloop, httptools, orjson), same body and answer | "
        f"{_n(r['ceiling_rps'])} req/s | | | |",
        f"| **Tide** `tide serve`: features + model + prediction log | **{_n(r['rps'])} req/s** | ceiling | "
        f"{_x(ratio['vs_ceiling'])} | ≥ {g['vs_ceiling']}x: {met['vs_ceiling']} |",
        f"| Feast {feast or ''} `feast serve`, same features from the same Redis (no scoring) | "
        f"{_n(r['feast_rps'])} req/s | Tide | Tide {_x(ratio['vs_feast'])} | "
        f"Tide ≥ {g['vs_feast']:g}x at a lower p99: {met['vs_feast']} |",
        f"| **Tide** p99 at half load ({_n(half.get('tide'))} req/s) | **{_ms(r['p99_ms_half_load'])} ms** | "
        f"Feast p99 at its half load ({_n(half.get('feast'))} req/s): "
        f"{_ms(r['feast_p99_ms_half_load'])} ms | "
        f"{_x(ratio['p99_vs_feast'])} | < {g['p99_ms_half_load']:g} ms: {met['p99_ms_half_load']} |",
        f"| **Tide** p99 while a new version is published every second | "
        f"**{_ms(r['p99_ms_swapping'])} ms** | "
        f"steady p99, same run and rate, quiet windows: {_ms(r['p99_ms_steady'])} ms | "
        f"{_x(ratio['swap_p99_ratio'])} (per run, median: {_x(ratio.get('swap_p99_ratio_per_run'))}) | "
        f"≤ {g['swap_p99_ratio']:g}x: {met['swap_p99_ratio']} |",
        "",
        f"Tide p50 at half load {_ms(r['p50_ms_half_load'])} ms (ceiling p99 at its half load "
        f"{_ms(r['ceiling_p99_ms_half_load'])} ms). Every Tide answer was 2xx: {met['all_2xx']} "
        f"({r['non_2xx_tide']} non-2xx); while swapping, {published} versions were published and each run "
        f"answered with at least {answered} different versions"
        + (
            f" (mean swap delay, publish to serving, per run: {', '.join(f'{d:.0f}' for d in delays)} ms)"
            if delays
            else ""
        )
        + ". Server CPU per request at maximum load, the figure least moved by the other work on this "
        f"machine: Tide {_ms(cpu.get('tide'))} ms, ceiling {_ms(cpu.get('ceiling'))} ms, Feast "
        f"{_ms(cpu.get('feast'))} ms.",
        "",
        "How far from each goal: throughput "
        + _far(ratio["vs_ceiling"], g["vs_ceiling"], True)
        + f" of {g['vs_ceiling']}x the ceiling; p99 at half load "
        + _far(r["p99_ms_half_load"] / g["p99_ms_half_load"] if r["p99_ms_half_load"] else None, 1.0, False)
        + f" {g['p99_ms_half_load']:g} ms; Feast "
        + ("met" if r["goals_met"]["vs_feast"] else _far(ratio["vs_feast"], g["vs_feast"], True) + " of 2x")
        + "; swapping "
        + _far(ratio["swap_p99_ratio"], g["swap_p99_ratio"], False)
        + ". Where Tide's time goes (py-spy), what each figure means and the caveats (coordinated omission, "
        "a shared 2-core machine): "
        "[`docs/2026-11-21-bench-serving.md`](docs/2026-11-21-bench-serving.md).",
        "",
        f"Reproduce: `{r['reproduce'].split('   #')[0]}` (raw results: `out/bench/serving.json`).",
    ]
    return "\n".join(lines)


def render_learn(r: dict[str, Any]) -> str:
    """The README block for ``out/bench/learn.json``."""
    ratio, met = r["ratios"], r["goals_met"]
    e2e = r.get("end_to_end_per_s", {})
    lines = [
        f"Online learner, `make bench-learn` ({r['measured_at'][:10]}): {r['examples']:,} examples of "
        f"`{r['dataset']}` through `{r['learner']}`, predict then learn, a version published every "
        f"{r['publish_every']} labels; median of {len(r['runs']['river'])} runs, in one process.",
        "",
        "| measure | examples/s | compared with | ratio | goal |",
        "|---|---:|---|---:|---|",
        f"| bare river (`progressive_val_score`'s loop) | {_n(r['river_per_s'])} | | | |",
        f"| bare river, pickled as often as Tide publishes | {_n(r['river_snapshots_per_s'])} | river | "
        f"{_x(r['river_snapshots_per_s'] / r['river_per_s'])} | |",
        f"| **Tide** trainer step (join, learn, publish) | **{_n(r['tide_per_s'])}** | river | "
        f"{_x(ratio['tide_vs_river'])} | ≥ 0.7x: {'met' if met['tide_vs_river'] else '**not met**'} |",
        f"| Tide end to end, served path (topics, Redis join) | {_n(e2e.get('served'))} | river | "
        f"{_x(ratio.get('served_vs_river'))} | |",
        "",
        f"Every prediction identical to bare river's: {'yes' if r['identical'] else '**no**'}. "
        f"Reproduce: `{r['reproduce'].split('   #')[0]}` (raw results: `out/bench/learn.json`).",
    ]
    return "\n".join(lines)


def _d(value: float | None) -> str:
    """A delay in records: a median that is a miss (no detection) is infinite."""
    if value is None:
        return "n/a"
    return "never" if value == float("inf") else f"{value:,.0f}"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def render_drift(r: dict[str, Any]) -> str:
    """The README block for ``out/bench/drift.json``."""
    tide, adwin, goals = r["tide"], r["adwin"], r.get("goals", {})
    lines = [
        f"Drift detection, `make bench-drift`: {r['seeds']} seeds of each stream, a change at record "
        f"{r['change_at']:,} of {r['records']['with_change']:,}, drift-free versions of "
        f"{r['records']['drift_free']:,} records; concept drift is an online learner's per-event loss fed to "
        "Tide's monitor (river's ADWIN and PageHinkley, one-sided, with cool-down) and to river's ADWIN "
        "alone. A miss counts as an infinite delay.",
        "",
        "| concept drift | median delay (records) | false alarms / 100k, drift-free | before the change | "
        "detected / missed | goal |",
        "|---|---:|---:|---:|---:|---|",
        f"| **Tide** `streams.concept.ConceptMonitor` | **{_d(tide['median_delay_records'])}** | "
        f"**{tide['false_alarms_per_100k']:g}** | {tide.get('false_alarms_before_change_per_100k', 0):g} | "
        f"{tide.get('detected', '?')} / {tide.get('missed', '?')} | delay ≤ ADWIN's: "
        f"{_met(goals.get('median_delay_no_worse_than_adwin'))}; ≤ 1 / 100k: "
        f"{_met(goals.get('false_alarms_per_100k_at_most_1'))} |",
        f"| river `ADWIN()` alone | {_d(adwin['median_delay_records'])} | "
        f"{adwin['false_alarms_per_100k']:g} | "
        f"{adwin.get('false_alarms_before_change_per_100k', 0):g} | {adwin.get('detected', '?')} / "
        f"{adwin.get('missed', '?')} | |",
    ]
    streams = r.get("streams", {})
    if streams:
        lines += [
            "",
            "| stream | Tide delay | ADWIN delay | Tide false alarms / 100k | ADWIN false alarms / 100k |",
        ]
        lines += ["|---|---:|---:|---:|---:|"]
        for name, s in streams.items():
            t, a = s["tide"], s["adwin"]
            lines.append(
                f"| {name} | {_d(t['median_delay_records'])} | {_d(a['median_delay_records'])} | "
                f"{t['false_alarms_per_100k']:g} | {a['false_alarms_per_100k']:g} |"
            )
    data = r.get("data_drift", {}).get("tide")
    if data:
        lines += [
            "",
            "Input drift (the drift scorer's tests by type, calibrated for "
            f"{data['false_alarm_rate_per_check']:g} false alarms per check): median delay "
            f"{_d(data['median_delay_records'])} records, "
            f"{data['false_alarms_per_100k']:g} false alarms per 100k records on drift-free inputs.",
        ]
        ev = r["data_drift"].get("evidently")
        if ev:
            tests, rearm, dataset = set(ev["tests"].values()), ev["with_tide_rearm"], ev["dataset_drift"]
            lines.append(
                f"Evidently {ev['version']} with its default tests ({', '.join(sorted(tests))}) on the same "
                f"windows and checks: median delay {_d(ev['median_delay_records'])} records, "
                f"{ev['false_alarms_per_100k']:g} false alarms per 100k records (each failed test; "
                f"{rearm['false_alarms_per_100k']:g} with Tide's re-arm; "
                f"{dataset['false_alarms_per_100k']:g} counting only its dataset drift, half the inputs or "
                f"more, delay {_d(dataset['median_delay_records'])})."
            )
    peers = r.get("peers", {})
    if peers:
        lines += ["", "Peers: " + "; ".join(f"{k}: {v}" for k, v in peers.items()) + "."]
    lines += ["", f"Reproduce: `{r['command']}` (raw results: `out/bench/drift.json`)."]
    return "\n".join(lines)


def render_canary(r: dict[str, Any]) -> str:
    """The README block for ``out/bench/canary.json``."""
    lines = [
        "Canary judge, `make bench-canary`: simulated candidates better, equal and worse than the champion "
        f"by {r['effect']:g} nats of mean log loss, non-inferiority margin {r['margin']:g}, "
        f"alpha {r['alpha']:g}; "
        "the judge's own decision code (always-valid confidence sequence, looked at continuously) beside a "
        "fixed-horizon z-test sized for the same alpha and 80 % power. False promotion: a worse candidate "
        "promoted; false rollback: an equal one rolled back; power: the better promoted and the worse "
        "rolled back.",
        "",
        "| arm | false promotion | false rollback (goal ≤ 5 %) | power | median labels to decide | "
        "fixed horizon: labels | fixed horizon: false rollback / power |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    goal = r.get("goal_false_rollback_rate", 0.05)
    for mode, m in r.get("modes", {"canary": r}).items():
        fh = m.get("fixed_horizon", {})
        lines.append(
            f"| {mode} | {m['false_promotion_rate']:.1%} | {m['false_rollback_rate']:.1%} "
            f"({_met(m['false_rollback_rate'] <= goal)}) | {m['power']:.1%} | "
            f"{_n(m['median_labels_to_decide'])} | {_n(m['fixed_horizon_labels'])} | "
            f"{fh.get('false_rollback_rate', 0):.1%} / {fh.get('power', 0):.1%} |"
        )
    lines += ["", f"Reproduce: `{r['command']}` (raw results: `out/bench/canary.json`)."]
    return "\n".join(lines)


BLOCKS = (
    ("features", "features.json", render_features, "run `make bench-features`"),
    ("serving", "serving.json", render_serving, "run `make bench-serving`"),
    ("learn", "learn.json", render_learn, "run `make bench-learn`"),
    ("drift", "drift.json", render_drift, "run `make bench-drift`"),
    ("canary", "canary.json", render_canary, "run `make bench-canary`"),
)


def insert_markers(text: str, name: str = "features") -> str:
    """Put empty markers at the end of the Performance section (before the next ``## `` heading)."""
    start, end_marker = markers(name)
    at = text.find("\n" + SECTION + "\n")
    if at < 0:
        raise SystemExit(f"README.md has no {SECTION!r} section to put the benchmark in")
    nxt = re.compile(r"^## ", re.M).search(text, at + len(SECTION) + 2)
    end = nxt.start() if nxt else len(text)
    body = text[:end].rstrip("\n")
    rest = text[end:]
    return body + f"\n\n{start}\n{end_marker}\n" + ("\n" + rest if rest else "")


def rewrite(readme: Path, results: Path, only: Sequence[str] | None = None) -> bool:
    """Rewrite the marked blocks (those named in ``only``, if given); returns whether README.md changed."""
    original = text = readme.read_text()
    for name, filename, render, how in BLOCKS:
        if only and name not in only:
            continue
        start, end = markers(name)
        fresh = start not in text or end not in text
        if fresh:
            text = insert_markers(text, name)
        source = results / filename
        if source.exists():
            block = render(json.loads(source.read_text()))
        elif fresh:
            block = f"_No {name} benchmark result yet: {how}._"
        else:
            continue  # keep what the README shows until a result is there to replace it
        head, _, tail = text.partition(start)
        _, _, tail = tail.partition(end)
        text = f"{head}{start}\n{block}\n{end}{tail}"
    if text != original:
        readme.write_text(text)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--results", type=Path, default=Path("out/bench"))
    parser.add_argument(
        "--only",
        action="append",
        choices=[name for name, *_ in BLOCKS],
        help="rewrite only this benchmark's block (repeatable; default: every block with a result)",
    )
    args = parser.parse_args(argv)
    changed = rewrite(args.readme, args.results, args.only)
    print(f"{args.readme}: {'benchmark section rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
