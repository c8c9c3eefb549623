"""Drift tests chosen by feature type, each calibrated on its reference for a stated false-alarm rate.

One test compares a full live window of one watched input (or the model's output) with the reference
profile of the model version that served it (:mod:`models.profile`):

- **numeric** (a histogram): the population stability index, its threshold simulated on the reference
  (:mod:`streams.psi`), and the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) of the
  live values' bins against the reference's — on binned data KS's p-value is conservative (ties only
  lower the statistic), so its false-alarm rate stays below the nominal one. The check fires when either
  does, each at half the rate (Bonferroni), so the check as a whole holds the rate.
- **categorical** (value counts): Pearson's chi-square on the 2 x k table of reference and live counts
  (``scipy.stats.chi2_contingency``); values expected fewer than :data:`MIN_EXPECTED` times in the
  window, and values the reference never saw, are pooled into one column first, so the chi-square
  approximation holds in the far tail.
- **binary** (counts of ``true``/``false``): the two proportions compared with Fisher's exact test
  (``scipy.stats.fisher_exact``), exact at any rate and with the reference's own sampling noise
  accounted for; the statistic is the difference of proportions, its threshold the smallest difference
  that would fire in the direction observed.

Each evaluation returns an :class:`Outcome`: the deciding statistic, its value and threshold, the
p-value, whether it fires, and whether it is *calm*: below the lower level the monitor must see (for
``cooldown_checks`` checks in a row) before it re-arms. The lower level is the statistic's critical value
at the rate ``rate ** rearm_ratio`` (with 0.5: a 1e-5 threshold re-arms below the 3e-3 critical value),
i.e. hysteresis stated in probability, so it means the same for every statistic; ``rearm_ratio`` 1 puts
it at the threshold, 0 never re-arms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol

import numpy as np
from scipy import stats

from infra.errors import StreamError
from models.profile import as_number, category_value, is_binary
from streams.psi import grouped, merge_bins, psi, psi_threshold

NUMERIC, CATEGORICAL, BINARY = "numeric", "categorical", "binary"
MIN_EXPECTED = 10.0  # expected live count of a categorical column kept on its own


@dataclass(frozen=True)
class Outcome:
    """One test of one full window (see the module docstring)."""

    statistic: str
    value: float
    threshold: float
    p_value: float | None
    fired: bool
    calm: bool
    estimate_before: float | None = None
    estimate_after: float | None = None


class DriftTest(Protocol):
    feature_type: str  # numeric, categorical or binary

    def convert(self, raw: Any) -> Any:
        """A served value as the window keeps it; raises ValueError/TypeError for a value of another type."""
        ...

    def evaluate(self, window: Sequence[Any]) -> Outcome: ...


def _check_histogram(h: Mapping[str, Any]) -> tuple[list[float], list[int]]:
    name = h.get("name", "?")
    edges = [float(e) for e in h["edges"]]
    counts = [int(c) for c in h["counts"]]
    if len(counts) != len(edges) + 1:
        raise StreamError(
            f"reference histogram {name!r} has {len(edges)} edges and {len(counts)} counts; "
            "expected one count more than edges"
        )
    if any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in pairwise(edges)):
        raise StreamError(f"reference histogram {name!r}: edges must be finite and strictly ascending")
    if any(c < 0 for c in counts) or sum(counts) == 0:
        raise StreamError(f"reference histogram {name!r}: counts must be non-negative, not all zero")
    return edges, counts


def _histogram_mean(edges: Sequence[float], counts: Sequence[int]) -> float | None:
    """The reference's mean as its histogram tells it: bin midpoints, the open outer bins placed half the
    neighbouring bin's width beyond their edge."""
    if len(edges) < 2:
        return float(edges[0]) if edges else None
    mids = [edges[0] - (edges[1] - edges[0]) / 2]
    mids += [(a + b) / 2 for a, b in pairwise(edges)]
    mids.append(edges[-1] + (edges[-1] - edges[-2]) / 2)
    return float(np.average(mids, weights=counts))


class NumericTest:
    """PSI and KS of a numeric window against a reference histogram (module docstring)."""

    feature_type = NUMERIC

    def __init__(
        self,
        histogram: Mapping[str, Any],
        window: int,
        rate: float,
        rearm_ratio: float,
        psi_floor: float | None = None,
    ) -> None:
        self.edges, self.counts = _check_histogram(histogram)
        self.window, self.rate, self.rearm_ratio = window, rate, rearm_ratio
        self._edges = np.asarray(self.edges, dtype=float)
        self._groups = merge_bins(self.counts, window)
        self._ref_grouped = [int(c) for c in grouped(self.counts, self._groups)]
        alpha = rate / 2  # Bonferroni over the two statistics
        threshold = psi_threshold(self._ref_grouped, window, alpha)
        self.psi_threshold = max(threshold, psi_floor) if psi_floor is not None else threshold
        self.psi_lower = _lower(
            psi_threshold(self._ref_grouped, window, alpha**rearm_ratio), self.psi_threshold
        )
        self._ref_bins = np.repeat(np.arange(len(self.counts)), self.counts)
        n, m = window, len(self._ref_bins)
        en = round(n * m / (n + m))
        self.ks_threshold = float(stats.kstwo.isf(alpha, en))
        self.ks_lower = _lower(float(stats.kstwo.isf(alpha**rearm_ratio, en)), self.ks_threshold)
        self.alpha = alpha
        self.reference_mean = _histogram_mean(self.edges, self.counts)

    def convert(self, raw: Any) -> float:
        if isinstance(raw, str):
            raise ValueError(f"{raw!r} is not a number")
        return as_number(raw)

    def evaluate(self, window: Sequence[Any]) -> Outcome:
        values = np.asarray(window, dtype=float)
        values = values[~np.isnan(values)]
        bins = np.searchsorted(self._edges, values, side="left")
        live = np.bincount(bins, minlength=len(self.counts))
        psi_value = psi(self._ref_grouped, [int(c) for c in grouped(live, self._groups)])
        ks = stats.ks_2samp(self._ref_bins, bins, method="asymp")
        ks_value, ks_p = float(ks.statistic), float(ks.pvalue)
        psi_fired = psi_value > self.psi_threshold
        ks_fired = ks_p < self.alpha
        calm = psi_value < self.psi_lower and ks_value < self.ks_lower
        mean = float(values.mean()) if len(values) else None
        if ks_fired and not psi_fired:
            return Outcome("ks", ks_value, self.ks_threshold, ks_p, True, calm, self.reference_mean, mean)
        return Outcome("psi", psi_value, self.psi_threshold, None, psi_fired, calm, self.reference_mean, mean)


class CategoricalTest:
    """Chi-square of a categorical window against reference value counts (module docstring)."""

    feature_type = CATEGORICAL

    def __init__(self, counts: Mapping[str, Any], window: int, rate: float, rearm_ratio: float) -> None:
        values, numbers = _check_counts(counts)
        self.window, self.rate, self.rearm_ratio = window, rate, rearm_ratio
        total = sum(numbers)
        # Values expected often enough keep their own column; the rest share the last one.
        kept = [v for v, c in zip(values, numbers, strict=True) if c / total * window >= MIN_EXPECTED]
        self._column = {v: i for i, v in enumerate(kept)}
        self._other = len(self._column)
        ref = [0] * (self._other + 1)
        for v, c in zip(values, numbers, strict=True):
            ref[self._column.get(v, self._other)] += c
        self._ref = ref
        self.threshold = float(stats.chi2.isf(rate, max(len(ref) - 1, 1)))

    def convert(self, raw: Any) -> str:
        return category_value(raw)

    def evaluate(self, window: Sequence[Any]) -> Outcome:
        live = [0] * (self._other + 1)
        for v in window:
            live[self._column.get(v, self._other)] += 1
        cols = [i for i in range(len(live)) if live[i] + self._ref[i] > 0]
        if len(cols) < 2:
            return Outcome("chi2", 0.0, self.threshold, 1.0, False, True)
        table = np.array([[self._ref[i] for i in cols], [live[i] for i in cols]])
        res = stats.chi2_contingency(table, correction=False)
        value, p = float(res.statistic), float(res.pvalue)
        threshold = float(stats.chi2.isf(self.rate, int(res.dof)))
        lower = _lower(float(stats.chi2.isf(self.rate**self.rearm_ratio, int(res.dof))), threshold)
        return Outcome("chi2", value, threshold, p, p < self.rate, value < lower)


class BinaryTest:
    """Fisher's exact test of a window's share of ``true`` against the reference's (module docstring)."""

    feature_type = BINARY

    def __init__(self, counts: Mapping[str, Any], window: int, rate: float, rearm_ratio: float) -> None:
        values, numbers = _check_counts(counts)
        by_value = dict(zip(values, numbers, strict=True))
        self.window, self.rate, self.rearm_ratio = window, rate, rearm_ratio
        self.ref_true = by_value.get("true", 0)
        self.ref_size = sum(numbers)
        self.reference_share = self.ref_true / self.ref_size
        self._critical: dict[tuple[int, float], float] = {}  # (direction, rate) -> smallest |difference|

    def convert(self, raw: Any) -> str:
        value = category_value(raw)
        if value not in ("true", "false"):
            raise ValueError(f"{raw!r} is not a boolean")
        return value

    def _p(self, k: int, n: int) -> float:
        table = [[k, n - k], [self.ref_true, self.ref_size - self.ref_true]]
        return float(stats.fisher_exact(table).pvalue)

    def _threshold(self, direction: int, n: int, rate: float) -> float:
        """The smallest |share difference| in ``direction`` (+1 up, -1 down) with p below ``rate``."""
        key = (direction, rate)
        if key in self._critical:
            return self._critical[key]
        centre = self.reference_share * n
        lo, hi = (math.ceil(centre), n) if direction > 0 else (0, math.floor(centre))
        if self._p(hi if direction > 0 else lo, n) >= rate:  # even the extreme share does not fire
            self._critical[key] = math.inf
            return math.inf
        # p falls monotonically moving away from the centre: bisect for the first k that fires.
        while hi - lo > 1:
            mid = (lo + hi) // 2
            fires = self._p(mid, n) < rate
            if direction > 0:
                lo, hi = (lo, mid) if fires else (mid, hi)
            else:
                lo, hi = (mid, hi) if fires else (lo, mid)
        k = hi if direction > 0 else lo
        self._critical[key] = abs(k / n - self.reference_share)
        return self._critical[key]

    def evaluate(self, window: Sequence[Any]) -> Outcome:
        n = len(window)
        k = sum(1 for v in window if v == "true")
        share = k / n
        diff = share - self.reference_share
        direction = 1 if diff >= 0 else -1
        threshold = self._threshold(direction, n, self.rate)
        lower = _lower(self._threshold(direction, n, self.rate**self.rearm_ratio), threshold)
        p = self._p(k, n)
        return Outcome(
            "proportion",
            abs(diff),
            threshold,
            p,
            p < self.rate,
            abs(diff) < lower,
            self.reference_share,
            share,
        )


def _lower(level: float, threshold: float) -> float:
    """The re-arm level: ``level`` (the critical value at the re-arm rate), never above the threshold."""
    return min(level, threshold) if math.isfinite(level) else 0.0


def _check_counts(c: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    name = c.get("name", "?")
    values = [str(v) for v in c["values"]]
    numbers = [int(n) for n in c["counts"]]
    if len(values) != len(numbers) or len(set(values)) != len(values):
        raise StreamError(f"reference counts {name!r}: one count per value, values unique")
    if any(n < 0 for n in numbers) or sum(numbers) == 0:
        raise StreamError(f"reference counts {name!r}: counts must be non-negative, not all zero")
    return values, numbers


def for_histogram(
    histogram: Mapping[str, Any], window: int, rate: float, rearm_ratio: float, psi_floor: float | None = None
) -> NumericTest:
    return NumericTest(histogram, window, rate, rearm_ratio, psi_floor)


def for_counts(counts: Mapping[str, Any], window: int, rate: float, rearm_ratio: float) -> DriftTest:
    """A binary test when the counts are of ``true``/``false``, else a categorical one."""
    if is_binary(counts["values"]):
        return BinaryTest(counts, window, rate, rearm_ratio)
    return CategoricalTest(counts, window, rate, rearm_ratio)
