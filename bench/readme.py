"""``python -m bench.readme``: rewrite the benchmark section of README.md from ``out/bench/*.json``.

Only the text between ``<!-- bench:features:start -->`` and ``<!-- bench:features:end -->`` is
replaced; if the markers are missing they are inserted at the end of the "## Performance" section.
Nothing else in README.md is touched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- bench:features:start -->", "<!-- bench:features:end -->"
SECTION = "## Performance"


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
        f"`{d['name']}` ({d.get('kind', 'sliding')}, {len(d['aggregations'])} aggregations)"
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
        "each batch with its offsets atomically in Redis (exactly-once effect, state readable by serving); "
        "Quix computes each window per event in its own RocksDB store, at-least-once, without a sink. "
        "Details, the profile and how to read the figures: "
        "[`docs/2026-11-21-bench-features.md`](docs/2026-11-21-bench-features.md).",
        "",
        f"Reproduce: `{r['reproduce'].split('   #')[0]}` (raw results: `out/bench/features.json`).",
    ]
    return "\n".join(lines)


def insert_markers(text: str) -> str:
    """Put empty markers at the end of the Performance section (before the next ``## `` heading)."""
    at = text.find("\n" + SECTION + "\n")
    if at < 0:
        raise SystemExit(f"README.md has no {SECTION!r} section to put the benchmark in")
    nxt = re.compile(r"^## ", re.M).search(text, at + len(SECTION) + 2)
    end = nxt.start() if nxt else len(text)
    body = text[:end].rstrip("\n")
    rest = text[end:]
    return body + f"\n\n{START}\n{END}\n" + ("\n" + rest if rest else "")


def rewrite(readme: Path, results: Path) -> bool:
    """Rewrite the marked section; returns whether README.md changed."""
    text = readme.read_text()
    if START not in text or END not in text:
        text = insert_markers(text)
    features = results / "features.json"
    if features.exists():
        block = render_features(json.loads(features.read_text()))
    else:
        block = "_No feature benchmark result yet: run `make bench-features`._"
    head, _, tail = text.partition(START)
    _, _, tail = tail.partition(END)
    new = f"{head}{START}\n{block}\n{END}{tail}"
    if new != readme.read_text():
        readme.write_text(new)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--results", type=Path, default=Path("out/bench"))
    args = parser.parse_args(argv)
    changed = rewrite(args.readme, args.results)
    print(f"{args.readme}: {'benchmark section rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
