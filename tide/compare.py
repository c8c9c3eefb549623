"""``tide demo --compare``: the same project run twice, with the loop's reactions on and then off, and
how much faster the online metric recovered from the injected change with them on.

Each run is a whole :func:`tide.demo.run_demo` on a fresh stack with the same seed and traffic, into
``<out>/on`` and ``<out>/off`` (each with its own ``report.json``, ``loop.png`` and ``logs/``). The off
run applies the project with every policy only reporting (:func:`tide.demo.without_reactions`).

``<out>/report.json`` is the on run's report plus:

- ``comparison``: per model whose policy retrains on alerts and that both runs measured,
  :func:`tide.recovery.compare` (records to recover and the metric after the change, on vs off);
- ``reactions_off``: the off run's recovery (its curve), verdicts, deployments, alerts, loop summary,
  ``ok`` and ``problems``;

and its ``ok`` requires the on run ok, the off run a valid control (every request answered, no service
exited, no alert before the change) and every compared model recovered faster with reactions on. The
off run's other problems (a concept alert it missed, say) are listed under ``warnings``.
``<out>/loop.png`` draws both curves (:func:`tide.plot.write_comparison_plot`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

from tide.demo import DemoConfig, run_demo
from tide.plot import write_comparison_plot
from tide.recovery import compare

log = logging.getLogger(__name__)

OFF_KEYS = ("recovery", "verdicts", "deployments", "drift_alerts", "loop", "ok", "problems", "elapsed_s")


def combine(on: Mapping[str, Any], off: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison report (see the module docstring) from the two runs' reports."""
    comparison = {}
    if on.get("drift_injected_at") is not None:
        for name, rec in on.get("recovery", {}).items():
            retrains = bool(on["models"][name].get("policy", {}).get("retrain", {}).get("on"))
            if retrains and name in off.get("recovery", {}):
                comparison[name] = compare(rec, off["recovery"][name])
    problems = list(on["problems"]) + [f"reactions off: {p}" for p in control_problems(off)]
    if on.get("drift_injected_at") is not None and not comparison:
        problems.append("no model both retrains on alerts and was measured in both runs")
    for name, c in comparison.items():
        if not c["faster"]:
            problems.append(
                f"model {name}: not recovered faster with reactions on (records to recover "
                f"{c['records_to_recover']}, {c['metric']} after the change {c['post_drift']})"
            )
    return {
        **on,
        "comparison": comparison,
        "reactions_off": {k: off.get(k) for k in OFF_KEYS} | {"report": "off/report.json"},
        "problems": problems,
        "warnings": [f"reactions off: {p}" for p in off["problems"]],
        "ok": not problems,
    }


def control_problems(off: Mapping[str, Any]) -> list[str]:
    """Why the off run cannot serve as the control: requests failed, a service exited, an alert came
    before the change, nothing was scored."""
    out = []
    if not off["serving"]["requests"]:
        out.append("no scoring requests")
    if off["serving"]["non_2xx"]:
        out.append(f"{off['serving']['non_2xx']} scoring requests failed")
    if off.get("services_exited"):
        out.append(f"services exited: {off['services_exited']}")
    early = [a for a in off["drift_alerts"] if a["delay_records"] is None or a["delay_records"] < 0]
    if off.get("drift_injected_at") is not None and early:
        out.append(f"{len(early)} drift alerts before the injection")
    return out


def run_compare(cfg: DemoConfig) -> dict[str, Any]:
    """Run the project with reactions on, then off; write and return the comparison report."""
    reports = {}
    for label, reactions in (("on", True), ("off", False)):
        log.info("demo run with the loop's reactions %s", label)
        reports[label] = run_demo(dataclasses.replace(cfg, reactions=reactions, out_dir=cfg.out_dir / label))
    report = combine(reports["on"], reports["off"])
    write_comparison_plot(reports["on"], reports["off"], cfg.out_dir / "loop.png")
    (cfg.out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
