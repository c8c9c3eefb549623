"""Evidently as a peer of ``make bench-drift``'s input-drift tests (``bench/drift.py``, data drift).

One file, two sides. In Tide's venv, :func:`run` writes the input streams (the reference records and the
live ones, by column) to a JSON file, runs this file with ``.venv-drift``'s python (Evidently 0.7 pins
pandas<2.2, below Tide's lock) and reads back, for each stream and seed, the inputs Evidently found drifted
at each check. In ``.venv-drift``, :func:`main` slides the same window (the last ``window`` live records)
over the stream at the same cadence (every ``check_every`` records once the window is full) and asks
Evidently, with its defaults, whether each input drifted:

- column types: Evidently's own inference (``Dataset.from_pandas``) on the reference records;
- tests: Evidently's default choice for each column and check (``get_stattest(reference, current, type,
  None)``: with a reference of more than 1000 rows, normed Wasserstein distance for numeric columns and
  Jensen-Shannon distance for categorical ones, each drifted above 0.1; up to 1000 rows, K-S, chi-square
  or z-tests, drifted at p < 0.05), called as ``ValueDrift`` calls it (infinities and NaNs dropped, the
  method's default threshold);
- a whole ``Report([DataDriftPreset()], include_tests=True)`` (~0.3 s each, too slow for every check) is
  run on a sample of checks and its per-column test results compared with these decisions
  (``report_agreement``).

Evidently keeps no state between checks: every check whose test fails is an alert.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SAMPLE_REPORTS = 6  # checks per stream (first seed) verified against a whole DataDriftPreset report


# -- Tide's side -----------------------------------------------------------------------------------------


def run(
    streams: list[dict[str, Any]], python: Path, window: int, check_every: int, workers: int = 2
) -> dict[str, Any]:
    """Evidently's decisions on ``streams`` (each ``{"stream", "seed", "reference": n, "columns": {name:
    values}}``, the first ``n`` values of each column the reference, the rest the live records).

    Returns ``{"version", "runs": [{"stream", "seed", "checks", "drifted": [[i, [inputs]], ...],
    "tests": {input: test}}], "report_agreement", "seconds"}``; raises ``RuntimeError`` with Evidently's
    last error line when the peer fails."""
    with tempfile.TemporaryDirectory(prefix="drift-evidently-") as tmp:
        source, target = Path(tmp) / "streams.json", Path(tmp) / "decisions.json"
        source.write_text(json.dumps({"window": window, "check_every": check_every, "streams": streams}))
        done = subprocess.run(
            [str(python), __file__, str(source), str(target), "--workers", str(workers)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise RuntimeError(last)
        result: dict[str, Any] = json.loads(target.read_text())
        return result


def alerts(
    peer: dict[str, Any], records: int, inputs: int, window: int, check_every: int, cooldown: int
) -> dict[str, list[tuple[int, str]]]:
    """(record, input) alerts from one stream's decisions, three ways: ``per_check`` (every failed test,
    as Evidently reports them), ``rearm`` (Tide's alarm rule on top: an input alerts once, then again only
    after ``cooldown`` checks in a row without drift) and ``dataset`` (Evidently's dataset drift: at least
    half the inputs drifted, ``DataDriftPreset(drift_share=0.5)``)."""
    from streams.drift_state import Alarm

    flagged = {int(i): set(ks) for i, ks in peer["drifted"]}
    per_check = [(i, k) for i, ks in sorted(flagged.items()) for k in sorted(ks)]
    dataset = [(i, "dataset") for i, ks in sorted(flagged.items()) if len(ks) >= 0.5 * inputs]
    alarms: dict[str, Alarm] = {}
    rearm = []
    for end in _check_ends(records, window, check_every):
        for k in sorted(peer["tests"]):
            fired = k in flagged.get(end, ())
            if alarms.setdefault(k, Alarm()).step(fired, not fired, cooldown):
                rearm.append((end, k))
    return {"per_check": per_check, "rearm": rearm, "dataset": dataset}


def figures(data: list[dict[str, Any]], python: Path, workers: int) -> dict[str, Any]:
    """Evidently's figures on bench.drift's input streams (its ``run_data`` results with ``values``), summed
    up as Tide's are (``median_delay_records``, ``false_alarms_per_100k``, ...)."""
    from bench.drift import CHECK_EVERY, COOLDOWN, DATA_STREAMS, REFERENCE, WINDOW, _data_summary

    streams = [
        {"stream": r["stream"], "seed": r["seed"], "reference": REFERENCE, "columns": r["values"]}
        for r in data
    ]
    peer = run(streams, python, WINDOW, CHECK_EVERY, workers)
    tide = {(r["stream"], r["seed"]): r for r in data}
    runs: dict[str, list[dict[str, Any]]] = {"per_check": [], "rearm": [], "dataset": []}
    tests: dict[str, str] = {}
    for p in peer["runs"]:
        r = tide[(p["stream"], p["seed"])]
        if p["checks"] != len(_check_ends(r["records"], WINDOW, CHECK_EVERY)):
            raise ValueError(
                f"Evidently made {p['checks']} checks of {r['stream']} seed {r['seed']}, not Tide's"
            )
        tests |= p["tests"]
        found = alerts(p, r["records"], r["inputs"], WINDOW, CHECK_EVERY, COOLDOWN)
        for how, found_alerts in found.items():
            base = {"stream": r["stream"], "records": r["records"], "change": r["change"]}
            runs[how].append(base | {"alerts": found_alerts})
    short = ("median_delay_records", "false_alarms_per_100k")
    out = _data_summary(runs["per_check"])
    del out["false_alarm_rate_per_check"]
    agree, sampled = peer["report_agreement"]
    return out | {
        "alerts": "every check whose default test fails, per input (Evidently keeps no alarm state)",
        "with_tide_rearm": {k: _data_summary(runs["rearm"])[k] for k in short},
        "dataset_drift": {k: _data_summary(runs["dataset"])[k] for k in short},
        "streams": {
            name: {k: _data_summary([r for r in runs["per_check"] if r["stream"] == name])[k] for k in short}
            for name in DATA_STREAMS
        },
        "tests": dict(sorted(tests.items())),
        "report_agreement": f"{agree}/{sampled} sampled checks alike in a whole DataDriftPreset report",
        "version": peer["version"],
        "seconds": peer["seconds"],
    }


# -- Evidently's side (.venv-drift) ----------------------------------------------------------------------


def _check_ends(live: int, window: int, check_every: int) -> list[int]:
    """Indices (into the live records) of the last record of each check's window, as bench/drift.py's."""
    return [i for i in range(live) if (i + 1) % check_every == 0 and i + 1 >= window]


def _stream(job: dict[str, Any], window: int, check_every: int, sample: bool) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    from evidently import Dataset
    from evidently.legacy.calculations.stattests.registry import get_stattest

    frame = pd.DataFrame(job["columns"])
    n_ref = job["reference"]
    reference, live = frame.iloc[:n_ref].reset_index(drop=True), frame.iloc[n_ref:].reset_index(drop=True)
    definition = Dataset.from_pandas(reference).data_definition
    types = {c: definition.get_column_type(c) for c in frame.columns}
    # ValueDrift drops infinities and NaNs from both sides; a column without any is used as it is.
    clean = {
        c: bool(np.isfinite(frame[c]).all()) if types[c].value == "num" else bool(frame[c].notna().all())
        for c in frame.columns
    }

    def _drop(series: pd.Series, c: str) -> pd.Series:
        return series if clean[c] else series.replace([-np.inf, np.inf], np.nan).dropna()

    refs = {c: _drop(reference[c], c) for c in frame.columns}
    # Evidently picks a column's default test at every check from the reference's size and the number of
    # distinct values in reference and window together (<= 2, <= 5 or more); where the reference alone
    # settles it (over 5 distinct values, or a categorical column of over 1000 rows) it is picked once.
    fixed = {
        c: get_stattest(refs[c], refs[c], kind, None)
        for c, kind in types.items()
        if refs[c].nunique() > 5 or (kind.value == "cat" and len(refs[c]) > 1000)
    }
    ends = _check_ends(len(live), window, check_every)
    drifted: list[list[Any]] = []
    decisions: dict[int, list[str]] = {}
    tests: dict[str, str] = {}
    for end in ends:
        current = live.iloc[end + 1 - window : end + 1]
        flagged = []
        for c, kind in types.items():
            cur = _drop(current[c], c)
            test = fixed.get(c) or get_stattest(refs[c], cur, kind, None)
            outcome = test(refs[c], cur, kind, None)
            tests.setdefault(c, f"{test.name} ({test.default_threshold:g})")
            if outcome.drifted:
                flagged.append(c)
        decisions[end] = flagged
        if flagged:
            drifted.append([end, flagged])
    out: dict[str, Any] = {
        "stream": job["stream"],
        "seed": job["seed"],
        "checks": len(ends),
        "drifted": drifted,
        "tests": tests,
    }
    if sample and ends:
        picks = sorted({ends[k * (len(ends) - 1) // (SAMPLE_REPORTS - 1)] for k in range(SAMPLE_REPORTS)})
        out["report_agreement"] = _verify(reference, live, definition, picks, window, decisions)
    return out


def _verify(
    reference: Any, live: Any, definition: Any, ends: list[int], window: int, decisions: dict[int, list[str]]
) -> list[int]:
    """[agreeing, sampled]: checks where a whole DataDriftPreset report fails the same columns' tests."""
    from evidently import Dataset, Report
    from evidently.presets import DataDriftPreset

    base = Dataset.from_pandas(reference, data_definition=definition)
    agree = 0
    for end in ends:
        current = Dataset.from_pandas(live.iloc[end + 1 - window : end + 1], data_definition=definition)
        tests = Report([DataDriftPreset()], include_tests=True).run(current, base).dict()["tests"]
        failed = sorted(
            t["metric_config"]["params"]["column"]
            for t in tests
            if t["metric_config"]["params"].get("type", "").endswith(":ValueDrift")
            and str(getattr(t["status"], "value", t["status"])) == "FAIL"
        )
        agree += failed == sorted(decisions[end])
    return [agree, len(ends)]


def _job(args: tuple[dict[str, Any], int, int, bool]) -> dict[str, Any]:
    return _stream(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evidently's default drift tests on bench.drift's inputs")
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import evidently

    spec = json.loads(args.source.read_text())
    first = {
        s["stream"]: min(j["seed"] for j in spec["streams"] if j["stream"] == s["stream"])
        for s in spec["streams"]
    }
    jobs = [
        (s, spec["window"], spec["check_every"], s["seed"] == first[s["stream"]]) for s in spec["streams"]
    ]
    if args.workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            runs = list(pool.map(_job, jobs))
    else:
        runs = [_job(j) for j in jobs]
    sampled = [r.pop("report_agreement") for r in runs if "report_agreement" in r]
    result = {
        "version": evidently.__version__,
        "runs": runs,
        "report_agreement": [sum(a for a, _ in sampled), sum(n for _, n in sampled)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.target.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
