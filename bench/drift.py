"""``make bench-drift``: Tide's drift monitors on streams with known change points, beside river's ADWIN.

**Concept drift.** Each stream is a labelled stream with one change of concept at a known record
(``CHANGE_AT``) and a drift-free twin: river's synthetic generators (SEA, Agrawal, Hyperplane, RandomRBF,
each joined to another concept by ``synth.ConceptDriftStream`` at a known position) and the examples'
generators (the fraud example's ring taking over at ``drift_at``, the delivery example's slowdown at
``slowdown_at``). An online river learner predicts each record, then learns it (progressive validation);
its per-event loss goes to Tide's ``ConceptMonitor`` (defaults, as the judge runs it) and, separately, to
river's ``ADWIN`` alone (default delta): 0/1 errors for the synthetic streams (ADWIN's classic use), and
for the examples what the judge itself feeds the monitor (``streams.outcomes``: the fraud model's log
loss, the delivery model's absolute error in minutes, both unbounded; the monitor scales them). Delay:
records from the change point to the first alarm at or after it (a miss counts as infinite in the
median). False alarms: alarms on the drift-free twins, per 100k records (and, reported beside, alarms
before the change point).

**Data drift.** Tide's per-type tests (``streams.drift_tests`` with the scorer's window, check interval
and alarm) on the fraud example's inputs (amount numeric, card_present binary, category and country
categorical; amounts rise and card-not-present purchases become common at ``drift_at``), the delivery
example's inputs (no input drift: its slowdown changes only the target) and Hyperplane's ten numeric
inputs (drift-free). Reference: the stream's first ``REFERENCE`` records.

**Peers.** Evidently or alibi-detect, where they install (``.venv-drift``, ``bench/requirements-drift.txt``);
otherwise the JSON says why. Evidently's default per-type tests run on the same input streams, reference,
windows, checks and seeds as Tide's (``bench/drift_evidently.py``, a subprocess in ``.venv-drift``), with
the same figures (``data_drift.evidently``). Writes ``out/bench/drift.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from river import compose, drift, linear_model, preprocessing
from river.datasets import synth

from bench import drift_evidently
from examples.food_delivery.driver.generator import GeneratorConfig as OrderConfig
from examples.food_delivery.driver.generator import OrderGenerator
from examples.fraud.driver.generator import GeneratorConfig as FraudConfig
from examples.fraud.driver.generator import TransactionGenerator
from models.profile import build_profile
from streams import drift_tests, outcomes
from streams.concept import ConceptMonitor
from streams.drift_state import Alarm

CHANGE_AT = 5_000
WIDTH = 50  # records over which ConceptDriftStream switches (river overflows on narrower ones this long)
LENGTH = 10_000  # records of a stream with a change
DRIFT_FREE = 25_000  # records of a drift-free twin
REFERENCE = 2_000  # data drift: records the reference profile is built from
WINDOW, CHECK_EVERY, RATE, COOLDOWN = 500, 50, 1e-5, 10  # the scorer's and policy's defaults
OUT = Path("out/bench/drift.json")
DRIFT_VENV = Path(".venv-drift")

Record = tuple[dict[str, Any], Any]
StreamFactory = Callable[[int, bool], Iterator[Record]]


# -- streams -----------------------------------------------------------------------------------------


def _concept(before: Any, after: Any, seed: int, drifting: bool) -> Iterator[Record]:
    if not drifting:
        return iter(before)
    return iter(synth.ConceptDriftStream(before, after, seed=seed, position=CHANGE_AT, width=WIDTH))


def sea(seed: int, drifting: bool) -> Iterator[Record]:
    return _concept(synth.SEA(variant=0, seed=seed), synth.SEA(variant=3, seed=seed + 1), seed, drifting)


def agrawal(seed: int, drifting: bool) -> Iterator[Record]:
    a = synth.Agrawal(classification_function=0, seed=seed)
    b = synth.Agrawal(classification_function=2, seed=seed + 1)
    return _concept(a, b, seed, drifting)


def hyperplane(seed: int, drifting: bool) -> Iterator[Record]:
    a = synth.Hyperplane(seed=seed, n_features=10, mag_change=0.0)
    b = synth.Hyperplane(seed=seed + 1000, n_features=10, mag_change=0.0)
    return _concept(a, b, seed, drifting)


def rbf(seed: int, drifting: bool) -> Iterator[Record]:
    a = synth.RandomRBF(seed_model=seed, seed_sample=seed, n_classes=2, n_features=8)
    b = synth.RandomRBF(seed_model=seed + 1000, seed_sample=seed + 1, n_classes=2, n_features=8)
    return _concept(a, b, seed, drifting)


def _clock() -> Callable[[], float]:
    ticks = itertools.count()
    return lambda: 1_700_000_000.0 + next(ticks) * 0.05  # 20 events a second, deterministic


def fraud_raw(seed: int, drifting: bool) -> Iterator[tuple[dict[str, Any], bool]]:
    config = FraudConfig(drift_at=CHANGE_AT if drifting else None, seed=seed, label_delay=0)
    gen = TransactionGenerator(config, clock=_clock())
    while True:
        event, due = gen.next()
        yield event, bool(due[-1]["is_fraud"])


def fraud(seed: int, drifting: bool) -> Iterator[Record]:
    for event, y in fraud_raw(seed, drifting):
        x = {
            "amount": math.log1p(event["amount"]),
            "card_present": float(event["card_present"]),
            "foreign": float(event["country"] != "US"),
            f"category={event['category']}": 1.0,
        }
        yield x, y


def delivery_raw(seed: int, drifting: bool) -> Iterator[tuple[dict[str, Any], float]]:
    config = OrderConfig(slowdown_at=CHANGE_AT if drifting else None, seed=seed, label_delay=0)
    gen = OrderGenerator(config, clock=_clock())
    while True:
        order, due = gen.next()
        yield order, float(due[-1]["minutes"])


def delivery(seed: int, drifting: bool) -> Iterator[Record]:
    for order, y in delivery_raw(seed, drifting):
        x = {"distance_km": order["distance_km"], "items": float(order["items"])}
        for k in ("cuisine", "daypart", "vehicle"):
            x[f"{k}={order[k]}"] = 1.0
        yield x, y


CONCEPT_STREAMS: dict[str, tuple[StreamFactory, str]] = {
    "sea": (sea, "zero_one"),
    "agrawal": (agrawal, "zero_one"),
    "hyperplane": (hyperplane, "zero_one"),
    "rbf": (rbf, "zero_one"),
    "fraud": (fraud, "binary"),  # the judge's signal for the task (streams.outcomes)
    "delivery": (delivery, "regression"),
}


# -- concept drift -------------------------------------------------------------------------------------


def _learner(loss: str) -> Any:
    model = linear_model.LinearRegression() if loss == "regression" else linear_model.LogisticRegression()
    return compose.Pipeline(preprocessing.StandardScaler(), model)


def _loss(kind: str, learner: Any, x: dict[str, Any], y: Any) -> float:
    if kind == "regression":
        prediction = {"score": float(learner.predict_one(x) or 0.0)}
    elif kind == "binary":
        prediction = {"score": learner.predict_proba_one(x).get(True, 0.5)}
    else:
        return float((learner.predict_proba_one(x).get(True, 0.5) >= 0.5) != bool(y))
    return outcomes.concept_signal(kind, outcomes.loss(kind, prediction, y))


def run_concept(name: str, seed: int, drifting: bool) -> dict[str, Any]:
    """One stream: alarms of Tide's monitor and of ADWIN alone, with Tide's estimated delays."""
    factory, kind = CONCEPT_STREAMS[name]
    n = LENGTH if drifting else DRIFT_FREE
    learner = _learner(kind)
    monitor, adwin = ConceptMonitor(), drift.ADWIN()
    tide: list[int] = []
    estimated: list[int] = []
    alone: list[int] = []
    for i, (x, y) in enumerate(itertools.islice(factory(seed, drifting), n)):
        y = y if kind == "regression" else bool(y)
        loss = _loss(kind, learner, x, y)
        learner.learn_one(x, y)
        change = monitor.update(loss)
        if change is not None:
            tide.append(i)
            estimated.append(change.delay_records)
        adwin.update(loss)
        if adwin.drift_detected:
            alone.append(i)
    return {
        "stream": name,
        "seed": seed,
        "drifting": drifting,
        "records": n,
        "tide": tide,
        "tide_estimated_delay": estimated,
        "adwin": alone,
    }


def _summary(runs: list[dict[str, Any]], who: str) -> dict[str, Any]:
    delays: list[float] = []
    errors: list[float] = []
    early = free_alarms = free_records = before_records = 0
    for r in runs:
        alarms = r[who]
        if r["drifting"]:
            before_records += CHANGE_AT
            early += sum(1 for a in alarms if a < CHANGE_AT)
            after = [(k, a) for k, a in enumerate(alarms) if a >= CHANGE_AT]
            delays.append(after[0][1] - CHANGE_AT if after else math.inf)
            if who == "tide" and after:
                k, a = after[0]
                errors.append(abs(r["tide_estimated_delay"][k] - (a - CHANGE_AT + 1)))
        else:
            free_records += r["records"]
            free_alarms += len(alarms)
    detected = [d for d in delays if math.isfinite(d)]
    out: dict[str, Any] = {
        "median_delay_records": _median(delays),
        "false_alarms_per_100k": round(free_alarms / free_records * 1e5, 3) if free_records else None,
        "false_alarms_before_change_per_100k": round(early / before_records * 1e5, 3)
        if before_records
        else None,
        "detected": len(detected),
        "missed": len(delays) - len(detected),
        "mean_delay_detected": round(statistics.fmean(detected), 1) if detected else None,
    }
    if who == "tide":
        out["delay_estimate_median_abs_error"] = _median(errors) if errors else None
    return out


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    m = statistics.median(values)
    return m if math.isinf(m) else round(float(m), 1)


# -- data drift ----------------------------------------------------------------------------------------


def fraud_inputs(seed: int, drifting: bool) -> Iterator[dict[str, Any]]:
    for event, _ in fraud_raw(seed, drifting):
        yield {k: event[k] for k in ("amount", "card_present", "category", "country")}


def delivery_inputs(seed: int, drifting: bool) -> Iterator[dict[str, Any]]:
    for order, _ in delivery_raw(seed, drifting):
        yield {k: order[k] for k in ("distance_km", "items", "cuisine", "daypart", "vehicle")}


def hyperplane_inputs(seed: int, drifting: bool) -> Iterator[dict[str, Any]]:
    for x, _ in synth.Hyperplane(seed=seed, n_features=10):
        yield {str(k): v for k, v in x.items()}


DATA_STREAMS: dict[str, tuple[Callable[[int, bool], Iterator[dict[str, Any]]], bool]] = {
    "fraud_inputs": (fraud_inputs, True),  # (factory, whether it has a change at CHANGE_AT)
    "delivery_inputs": (delivery_inputs, False),
    "hyperplane_inputs": (hyperplane_inputs, False),
}


def run_data(name: str, seed: int, keep: bool = False) -> dict[str, Any]:
    """Tide's per-type tests on one input stream: (record, input) of each alert; with ``keep``, the
    stream's values by input too (``values``, the first ``REFERENCE`` of them the reference) for a peer."""
    factory, drifting = DATA_STREAMS[name]
    n = REFERENCE + (LENGTH - CHANGE_AT) * 2 if drifting else DRIFT_FREE
    rows = list(itertools.islice(factory(seed, drifting), n))
    # the change comes CHANGE_AT records into the stream; the reference is its first REFERENCE records
    reference, live = rows[:REFERENCE], rows[REFERENCE:]
    change = CHANGE_AT - REFERENCE if drifting else None
    names = list(reference[0])
    profile = build_profile(reference, [], names)
    tests: dict[str, Any] = {
        h["name"]: drift_tests.for_histogram(h, WINDOW, RATE, 0.5) for h in profile["features"]
    }
    tests |= {c["name"]: drift_tests.for_counts(c, WINDOW, RATE, 0.5) for c in profile["categories"]}
    windows: dict[str, deque[Any]] = {k: deque(maxlen=WINDOW) for k in tests}
    alarms = {k: Alarm() for k in tests}
    alerts: list[tuple[int, str]] = []
    for i, row in enumerate(live):
        for k, t in tests.items():
            windows[k].append(t.convert(row.get(k)))
        if (i + 1) % CHECK_EVERY == 0 and i + 1 >= WINDOW:
            for k, t in tests.items():
                out = t.evaluate(list(windows[k]))
                if alarms[k].step(out.fired, out.calm, COOLDOWN):
                    alerts.append((i, k))
    out = {
        "stream": name,
        "seed": seed,
        "records": len(live),
        "change": change,
        "alerts": alerts,
        "checks": len(live) // CHECK_EVERY,
        "inputs": len(tests),
    }
    if keep:
        out["values"] = {k: [row.get(k) for row in rows] for k in names}
    return out


def _data_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    delays: list[float] = []
    false_alarms = records = 0
    per_input: dict[str, list[float]] = {}
    for r in runs:
        change = r["change"]
        if change is None:
            false_alarms += len(r["alerts"])
            records += r["records"]
            continue
        false_alarms += sum(1 for i, _ in r["alerts"] if i < change)
        records += change
        after = [(i, k) for i, k in r["alerts"] if i >= change]
        delays.append(after[0][0] - change if after else math.inf)
        for k in {k for _, k in r["alerts"]}:
            first = min((i for i, kk in after if kk == k), default=None)
            if first is not None:
                per_input.setdefault(k, []).append(first - change)
    return {
        "median_delay_records": _median(delays),
        "false_alarms_per_100k": round(false_alarms / records * 1e5, 3) if records else None,
        "false_alarm_rate_per_check": RATE,
        "median_delay_by_input": {k: _median(v) for k, v in sorted(per_input.items())},
    }


# -- peers ---------------------------------------------------------------------------------------------


def peers(data: list[dict[str, Any]], workers: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What the peer venv holds, and Evidently's input-drift figures where it runs (bench/drift_evidently.py:
    the same streams, reference, windows, checks and seeds as Tide's tests)."""
    python = DRIFT_VENV / "bin" / "python"
    out: dict[str, Any] = {}
    figures = None
    for name, module in (("evidently", "evidently"), ("alibi-detect", "alibi_detect")):
        if not python.exists():
            out[name] = f"not installed: {DRIFT_VENV} does not exist (make bench-drift creates it)"
            continue
        probe = subprocess.run(
            [str(python), "-c", f"import {module}; print({module}.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if probe.returncode != 0:
            reason = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
            out[name] = f"not installed: {reason}"
        elif name != "evidently":
            out[name] = f"installed {probe.stdout.strip()}, not run: no comparison on these streams yet"
        else:
            try:
                figures = drift_evidently.figures(data, python, workers)
                out[name] = f"ran {figures['version']}"
            except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                out[name] = f"installed {probe.stdout.strip()}, failed: {e}"
    return out, figures


# -- main ------------------------------------------------------------------------------------------------


def _job(args: tuple[str, str, int, bool]) -> dict[str, Any]:
    kind, name, seed, drifting = args
    return run_concept(name, seed, drifting) if kind == "concept" else run_data(name, seed, keep=drifting)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    seeds = range(1, args.seeds + 1)
    jobs = [("concept", n, s, d) for n in CONCEPT_STREAMS for s in seeds for d in (True, False)]
    keep = (DRIFT_VENV / "bin" / "python").exists()  # the inputs themselves, for the peers
    jobs += [("data", n, s, keep) for n in DATA_STREAMS for s in seeds]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(_job, jobs))
    concept = [r for r in results if "tide" in r]
    data = [r for r in results if "alerts" in r]
    peer_status, evidently = peers(data, args.workers)
    for r in data:
        r.pop("values", None)
    result: dict[str, Any] = {
        "command": f"python -m bench.drift --seeds {args.seeds}",
        "seeds": args.seeds,
        "change_at": CHANGE_AT,
        "records": {"with_change": LENGTH, "drift_free": DRIFT_FREE},
        "tide": _summary(concept, "tide"),
        "adwin": _summary(concept, "adwin"),
        "streams": {
            name: {
                who: _summary([r for r in concept if r["stream"] == name], who) for who in ("tide", "adwin")
            }
            for name in CONCEPT_STREAMS
        },
        "data_drift": {
            "tide": _data_summary(data),
            "streams": {
                name: _data_summary([r for r in data if r["stream"] == name]) for name in DATA_STREAMS
            },
            "window": WINDOW,
            "check_every": CHECK_EVERY,
        },
        "peers": peer_status,
        "python": sys.version.split()[0],
    }
    tide, adwin = result["tide"], result["adwin"]
    if evidently is not None:
        result["data_drift"]["evidently"] = evidently
    result["goals"] = {
        "median_delay_no_worse_than_adwin": _le(tide["median_delay_records"], adwin["median_delay_records"]),
        "false_alarms_per_100k_at_most_1": (tide["false_alarms_per_100k"] or 0) <= 1.0,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    _print(result)
    print(f"wrote {args.out}")
    return 0


def _le(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a <= b


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {value!r}")


def _print(result: dict[str, Any]) -> None:
    print(f"# {result['command']}  ({result['seconds']} s)")
    head = ("stream", "who", "median delay", "missed", "FA/100k free", "FA/100k pre")
    print(f"{head[0]:<12} {head[1]:<6} {head[2]:>12} {head[3]:>6} {head[4]:>12} {head[5]:>11}")
    for name, by in result["streams"].items():
        for who, s in by.items():
            print(
                f"{name:<12} {who:<6} {s['median_delay_records']!s:>12} {s['missed']:>6} "
                f"{s['false_alarms_per_100k']!s:>12} {s['false_alarms_before_change_per_100k']!s:>11}"
            )
    for who in ("tide", "adwin"):
        s = result[who]
        print(
            f"{'ALL':<12} {who:<6} {s['median_delay_records']!s:>12} {s['missed']:>6} "
            f"{s['false_alarms_per_100k']!s:>12}"
        )
    d = result["data_drift"]["tide"]
    print(
        f"data drift (Tide per-type tests): median delay {d['median_delay_records']}, "
        f"false alarms per 100k {d['false_alarms_per_100k']}, by input {d['median_delay_by_input']}"
    )
    e = result["data_drift"].get("evidently")
    if e:
        print(
            f"data drift (Evidently {e['version']}, {sorted(set(e['tests'].values()))}): median delay "
            f"{e['median_delay_records']}, false alarms per 100k {e['false_alarms_per_100k']} per check, "
            f"{e['with_tide_rearm']['false_alarms_per_100k']} with Tide's re-arm; {e['report_agreement']}"
        )
    print(f"goals: {result['goals']}")
    print(f"peers: {result['peers']}")


if __name__ == "__main__":
    sys.exit(main())
