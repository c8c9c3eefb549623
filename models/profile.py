"""Reference profiles: what a model version's inputs and output looked like in training, published with
the version (``model_version.reference``) and compared with live traffic by the drift scorer.

- A **numeric** input (numbers; a missing value counts as 0.0) gets a histogram whose edges are
  quantiles of the reference sample, so each bin holds about the same share of it: ``len(edges) + 1``
  bins, bin ``i`` holding the values in ``(edges[i-1], edges[i]]``.
- A **categorical** input (strings) or **binary** one (booleans) gets its value counts (``categories``):
  values as strings, booleans as ``true``/``false``, a missing value as ``null``
  (:func:`category_value`), most frequent first.
- The model's **output**: a histogram of its scores under :data:`SCORE` (``prediction``) and, for a
  multiclass model, the counts of its predicted labels under :data:`LABEL` (in ``categories``).

Which inputs are categorical is read from the values (any string or boolean makes the input
categorical), or named explicitly with ``categorical=`` (e.g. integer-coded categories).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SCORE = "__score__"  # the output's histogram (and the output's name in drift alerts)
LABEL = "__label__"  # a multiclass model's predicted labels, in ``categories``
TRUE, FALSE, NULL = "true", "false", "null"
_EPS = 1e-4


def as_number(value: Any) -> float:
    return float(value) if value is not None else 0.0


def category_value(value: Any) -> str:
    """A value as categorical counts hold it: booleans ``true``/``false``, None ``null``, else ``str``."""
    if value is None:
        return NULL
    if isinstance(value, bool | np.bool_):
        return TRUE if value else FALSE
    return str(value)


def is_categorical(values: Iterable[Any]) -> bool:
    """Whether a column is counted rather than histogrammed: it holds a string or a boolean."""
    return any(isinstance(v, str | bool | np.bool_ | np.str_) for v in values)


def is_binary(values: Collection[str]) -> bool:
    """Whether categorical counts are those of a binary input (their values ``true``/``false``)."""
    return bool(values) and set(values) <= {TRUE, FALSE}


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


def category_counts(name: str, values: Iterable[Any]) -> dict[str, Any]:
    """A ``CategoryCounts`` record: each value's count, most frequent first (ties by value)."""
    counts = Counter(category_value(v) for v in values)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {"name": name, "values": [v for v, _ in ordered], "counts": [c for _, c in ordered]}


def profile_from_columns(
    columns: Mapping[str, Sequence[Any]],
    scores: Sequence[float],
    *,
    labels: Sequence[Any] | None = None,
    categorical: Collection[str] = (),
    size: int | None = None,
    bins: int = 10,
) -> dict[str, Any]:
    """A ReferenceProfile record from raw input columns (name -> values, as served: numbers, strings,
    booleans, None), the scores given to the examples and, for a multiclass model, their predicted
    ``labels``. ``size`` defaults to the longest column."""
    features: list[dict[str, Any]] = []
    categories: list[dict[str, Any]] = []
    for name, values in columns.items():
        if name in categorical or is_categorical(values):
            categories.append(category_counts(name, values))
        elif values:
            features.append(histogram(name, [as_number(v) for v in values], bins))
    if labels:
        categories.append(category_counts(LABEL, labels))
    n = size if size is not None else max([len(scores), *(len(v) for v in columns.values())], default=0)
    return {
        "size": n,
        "features": features,
        "prediction": histogram(SCORE, list(scores), bins) if scores else None,
        "categories": categories,
    }


def build_profile(
    rows: Sequence[Mapping[str, Any]],
    scores: Sequence[float],
    features: Sequence[str],
    bins: int = 10,
    *,
    labels: Sequence[Any] | None = None,
    categorical: Collection[str] = (),
) -> dict[str, Any]:
    """A ReferenceProfile record from a sample of input rows, the scores given to them and (multiclass)
    the labels predicted for them; see :func:`profile_from_columns`."""
    columns = {f: [r.get(f) for r in rows] for f in features}
    return profile_from_columns(
        columns, scores, labels=labels, categorical=categorical, size=len(rows), bins=bins
    )


def psi(reference_counts: Sequence[int], live_counts: Sequence[int]) -> float:
    """Population stability index between two histograms on the same bins."""
    ref_total, live_total = sum(reference_counts) or 1, sum(live_counts) or 1
    total = 0.0
    for r, c in zip(reference_counts, live_counts, strict=True):
        p, q = max(r / ref_total, _EPS), max(c / live_total, _EPS)
        total += (q - p) * math.log(q / p)
    return total
