"""Summaries of py-spy profiles (raw collapsed stacks), shared by the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (component label, substrings of a frame that put a sample in it); the innermost matching frame wins.
Components = Sequence[tuple[str, Sequence[str]]]


def summarize(path: Path, components: Components, top: int = 25) -> dict[str, Any]:
    """Own (self) and inclusive sample shares per function, shares per component and, when py-spy ran
    with ``--threads`` (each stack rooted at its thread), per thread."""
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
        if frames and frames[0].startswith("thread ("):
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

    out = {
        "samples": total,
        "by_component_pct": share(comp),
        "self_pct": share(self_s),
        "inclusive_pct": share(incl),
    }
    if threads:
        out["by_thread_pct"] = share(threads)
    return out
