"""Always-valid confidence sequences for a difference in mean loss (the judge's statistics).

A fixed-horizon confidence interval is valid at one sample size chosen in advance; looked at after every
label, it excludes the truth far more often than its level says. A *confidence sequence* holds at every
sample size at once: ``P(for all t: truth in C_t) >= 1 - alpha``, so the judge may look after each label
and stop as soon as it is decided.

Tide uses the asymptotic confidence sequence (AsympCS) of Waudby-Smith, Arbour, Sinha, Kennedy and
Ramdas, "Time-uniform central limit theory and asymptotic confidence sequences" (Annals of Statistics,
2024; arXiv 2103.06476), Theorem 2.2: with ``t`` observations of mean ``m_t`` and sample standard
deviation ``s_t``::

    m_t +- s_t * sqrt( 2 (t rho^2 + 1) / (t^2 rho^2) * log( sqrt(t rho^2 + 1) / alpha ) )

is a two-sided (1 - alpha) confidence sequence (Robbins' normal-mixture boundary, made distribution-free
by the strong invariance principle). ``rho`` sets where it is tightest; the paper's choice
``rho^2 = (-2 log alpha + log(-2 log alpha + 1)) / t_opt`` minimises its width at ``t_opt`` labels.

Written with ``v = s_t^2 / t`` (the variance of the estimate) and ``tau = t rho^2`` (intrinsic time), the
half-width is ``sqrt(2 v (tau + 1) / tau * log(sqrt(tau + 1) / alpha))``. That form serves both uses:

- **paired** (a shadow: candidate and champion scored the same events): ``d_i = loss_candidate -
  loss_champion`` per event, one-sample AsympCS on the ``d_i``;
- **unpaired** (a canary: its sticky share against the champion's traffic over the same period): the
  estimate is ``mean_c - mean_b`` with variance ``v = s_c^2 / n_c + s_b^2 / n_b`` (variances added) and
  intrinsic time ``tau = rho^2 (s_c^2 + s_b^2) / v`` (with equal counts ``n``, ``tau = n rho^2`` as in
  the paired case; otherwise the effective count is a weighted harmonic mean of the two).

The guarantee is asymptotic (valid as counts grow, under finite variance); the judge decides only after
``min_labels`` labels, where it holds well (tests/unit/test_sequential.py simulates it under continuous
monitoring). Running moments (Welford, merged by Chan et al.'s formula) are plain floats, so the state
snapshots cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

VARIANCE_FLOOR = 1e-12  # a run of identical losses must not give a zero-width interval


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of a stream of numbers (Welford)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def update_many(self, xs: Iterable[float] | np.ndarray) -> None:
        """Fold a batch in at once (Chan et al.'s merge of two sets of moments)."""
        arr = np.asarray(xs, dtype=float)
        if arr.size == 0:
            return
        nb, mb = int(arr.size), float(arr.mean())
        m2b = float(((arr - mb) ** 2).sum())
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.mean += delta * nb / n
        self.n = n

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator); 0 below two observations."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


@dataclass(frozen=True)
class Interval:
    """An estimate of ``candidate - champion`` mean loss and its always-valid interval."""

    estimate: float
    lower: float
    upper: float
    n: int  # pairs (paired) or candidate observations (unpaired)
    n_champion: int


def rho_squared(alpha: float, t_opt: float) -> float:
    """The mixing parameter that makes the sequence tightest at ``t_opt`` observations (the paper's)."""
    a = -2.0 * math.log(alpha)
    return (a + math.log(a + 1.0)) / max(t_opt, 1.0)


def half_width(variance_of_estimate: Any, tau: Any, alpha: float) -> Any:
    """The AsympCS half-width for an estimate of variance ``variance_of_estimate`` at intrinsic time
    ``tau`` (``t rho^2``). Takes floats or numpy arrays (simulations evaluate whole paths at once)."""
    v = np.maximum(variance_of_estimate, VARIANCE_FLOOR)
    tau = np.asarray(tau, dtype=float)
    return np.sqrt(2.0 * v * (tau + 1.0) / tau * np.log(np.sqrt(tau + 1.0) / alpha))


class PairedSequence:
    """Confidence sequence on the mean of per-event differences ``d_i`` (shadow: same events)."""

    def __init__(self, alpha: float, t_opt: float) -> None:
        self.alpha = alpha
        self.t_opt = t_opt
        self.diff = Moments()

    def update(self, candidate_loss: float, champion_loss: float) -> None:
        self.diff.update(candidate_loss - champion_loss)

    def update_many(self, candidate: np.ndarray, champion: np.ndarray) -> None:
        self.diff.update_many(np.asarray(candidate, dtype=float) - np.asarray(champion, dtype=float))

    @property
    def n(self) -> int:
        return self.diff.n

    @property
    def n_champion(self) -> int:
        return self.diff.n

    def interval(self) -> Interval | None:
        """None before two pairs."""
        d = self.diff
        if d.n < 2:
            return None
        tau = d.n * rho_squared(self.alpha, self.t_opt)
        w = float(half_width(d.variance / d.n, tau, self.alpha))
        return Interval(d.mean, d.mean - w, d.mean + w, d.n, d.n)


class UnpairedSequence:
    """Confidence sequence on ``mean(candidate) - mean(champion)`` of two independent samples (canary)."""

    def __init__(self, alpha: float, t_opt: float) -> None:
        self.alpha = alpha
        self.t_opt = t_opt
        self.candidate = Moments()
        self.champion = Moments()

    def update_candidate(self, loss: float) -> None:
        self.candidate.update(loss)

    def update_champion(self, loss: float) -> None:
        self.champion.update(loss)

    @property
    def n(self) -> int:
        return self.candidate.n

    @property
    def n_champion(self) -> int:
        return self.champion.n

    def interval(self) -> Interval | None:
        """None before two observations on each side."""
        c, b = self.candidate, self.champion
        if c.n < 2 or b.n < 2:
            return None
        sc, sb = max(c.variance, VARIANCE_FLOOR), max(b.variance, VARIANCE_FLOOR)
        v = sc / c.n + sb / b.n
        tau = rho_squared(self.alpha, self.t_opt) * (sc + sb) / v
        w = float(half_width(v, tau, self.alpha))
        est = c.mean - b.mean
        return Interval(est, est - w, est + w, c.n, b.n)
