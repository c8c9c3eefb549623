"""The population stability index (PSI) of a live window against a reference histogram, and its threshold
calibrated on the reference for a stated false-alarm rate.

PSI has no closed-form null distribution, so the threshold is found by simulation: windows of the live
size and references of the reference size are drawn (multinomial) from the reference's bin shares, which
is the null hypothesis that live traffic comes from the population the reference sampled (the
reference's own sampling noise included). Twenty thousand draws cannot reach a 1e-5 tail directly; the
simulated PSI is matched on its mean and variance to a scaled chi-square ``a * chi2(nu)`` (Satterthwaite;
PSI is to second order a chi-square distance between the two histograms) and the threshold is that
distribution's ``1 - rate`` quantile. Bins whose expected live count is under :data:`MIN_EXPECTED` are
merged with their neighbours first: a sparsely filled bin gives PSI a heavier tail than the chi-square
shape can follow. Seeded per reference, so a restarted scorer computes the same thresholds.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import numpy as np
from scipy import stats

from models.profile import psi

__all__ = ["MIN_EXPECTED", "merge_bins", "psi", "psi_many", "psi_threshold"]

MIN_EXPECTED = 20.0  # expected live values per (merged) bin
DRAWS = 20_000
_EPS = 1e-4  # as models.profile.psi


def merge_bins(reference_counts: Sequence[int], window: int) -> list[int]:
    """Group of each bin after merging adjacent bins until each group expects ``MIN_EXPECTED`` live
    values out of ``window`` (a too-small last group joins the one before it)."""
    counts = np.asarray(reference_counts, dtype=float)
    expected = counts / counts.sum() * window
    groups: list[int] = []
    group, acc = 0, 0.0
    for e in expected:
        groups.append(group)
        acc += e
        if acc >= MIN_EXPECTED:
            group, acc = group + 1, 0.0
    if acc and group > 0:  # the trailing bins expect too few: join the previous group
        groups = [min(g, group - 1) for g in groups]
    return groups


def grouped(counts: Sequence[int] | np.ndarray, groups: Sequence[int]) -> np.ndarray:
    """``counts`` summed per group (the last axis)."""
    arr = np.asarray(counts)
    n = max(groups) + 1
    out = np.zeros((*arr.shape[:-1], n), dtype=arr.dtype)
    for i, g in enumerate(groups):
        out[..., g] += arr[..., i]
    return out


def psi_many(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """PSI of each row of ``live`` against the matching row of ``reference`` (counts, same bins)."""
    p = np.maximum(reference / reference.sum(axis=-1, keepdims=True), _EPS)
    q = np.maximum(live / live.sum(axis=-1, keepdims=True), _EPS)
    return np.asarray(((q - p) * np.log(q / p)).sum(axis=-1))


@functools.lru_cache(maxsize=1024)
def _threshold(counts: tuple[int, ...], window: int, rate: float) -> float:
    total = sum(counts)
    shares = np.asarray(counts, dtype=float) / total
    if np.count_nonzero(shares) < 2:
        return float("inf")  # one bin: PSI is always 0, nothing can drift
    rng = np.random.default_rng(zlib.crc32(repr((counts, window)).encode()))
    refs = rng.multinomial(total, shares, size=DRAWS)
    lives = rng.multinomial(window, shares, size=DRAWS)
    sim = psi_many(refs, lives)
    mean, var = float(sim.mean()), float(sim.var())
    if var <= 0 or mean <= 0:
        return float(sim.max()) or float("inf")
    nu = 2 * mean * mean / var
    return float(var / (2 * mean) * stats.chi2.isf(rate, nu))


def psi_threshold(reference_counts: Sequence[int], window: int, rate: float) -> float:
    """The PSI a ``window`` of live values exceeds with probability ``rate`` when it comes from the
    reference's population (counts already merged with :func:`merge_bins`); cached per reference."""
    return _threshold(tuple(int(c) for c in reference_counts), int(window), float(rate))
