"""Reference profiles: histograms of inputs and scores, published with each model version.

Edges are quantiles of the reference sample, so each bin holds about the same share of it; live data
binned on the same edges is compared with the population stability index (PSI).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SCORE = "__score__"
_EPS = 1e-4


def as_number(value: Any) -> float:
    return float(value) if value is not None else 0.0


def quantile_edges(values: Sequence[float], bins: int) -> list[float]:
    """Interior bin edges (``bins - 1`` at most, deduplicated) at the sample's quantiles."""
    qs = np.quantile(np.asarray(values, dtype=float), np.linspace(0, 1, bins + 1)[1:-1])
    return sorted({float(q) for q in qs})


def bin_counts(edges: Sequence[float], values: Iterable[float]) -> list[int]:
    """Counts per bin: ``(-inf, e0], (e0, e1], ..., (e_last, inf)``."""
    data = np.fromiter(values, dtype=float)
    bins = np.searchsorted(np.asarray(edges, dtype=float), data, side="left")
    return [int(c) for c in np.bincount(bins, minlength=len(edges) + 1)]


def histogram(name: str, values: Sequence[float], bins: int = 10) -> dict[str, Any]:
    edges = quantile_edges(values, bins)
    return {"name": name, "edges": edges, "counts": bin_counts(edges, values)}


def build_profile(
    rows: Sequence[Mapping[str, Any]], scores: Sequence[float], features: Sequence[str], bins: int = 10
) -> dict[str, Any]:
    """A ReferenceProfile record from a sample of feature rows and the scores given to them."""
    return {
        "size": len(rows),
        "features": [histogram(f, [as_number(r.get(f)) for r in rows], bins) for f in features],
        "prediction": histogram(SCORE, list(scores), bins) if scores else None,
    }


def psi(reference_counts: Sequence[int], live_counts: Sequence[int]) -> float:
    """Population stability index between two histograms on the same bins."""
    ref_total, live_total = sum(reference_counts) or 1, sum(live_counts) or 1
    total = 0.0
    for r, c in zip(reference_counts, live_counts, strict=True):
        p, q = max(r / ref_total, _EPS), max(c / live_total, _EPS)
        total += (q - p) * math.log(q / p)
    return total
