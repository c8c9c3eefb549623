"""The always-valid confidence sequences of streams.sequential: moments, coverage under continuous
monitoring (seeded simulations), and the paired / unpaired classes against the vectorised boundary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streams.sequential import (
    Moments,
    PairedSequence,
    UnpairedSequence,
    half_width,
    rho_squared,
)

ALPHA = 0.05
BURN_IN = 50  # the judge never decides before min_labels; the guarantee is asymptotic
SLACK = 0.03


def _log_loss_differences(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Per-event log-loss differences of a noisier model against a calibrated one (skewed, heavy-ish)."""
    p = rng.beta(2, 8, shape)
    y = rng.random(shape) < p
    q = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + rng.normal(0, 0.7, shape))))
    return np.where(y, np.log(p) - np.log(q), np.log(1 - p) - np.log(1 - q))


def _paired_miss_rate(x: np.ndarray, truth: float, t_opt: float) -> float:
    """Share of runs (rows) whose confidence sequence excluded ``truth`` at any time from BURN_IN on."""
    n = np.arange(1, x.shape[1] + 1)
    mean = np.cumsum(x, 1) / n
    var = (np.cumsum(x * x, 1) - n * mean * mean) / np.maximum(n - 1, 1)
    width = half_width(var / n, n * rho_squared(ALPHA, t_opt), ALPHA)
    return float((np.abs(mean - truth) > width)[:, BURN_IN - 1 :].any(1).mean())


def test_moments_match_numpy_one_by_one_and_merged() -> None:
    rng = np.random.default_rng(0)
    xs = rng.exponential(2.0, 1001)
    one, merged = Moments(), Moments()
    for x in xs:
        one.update(float(x))
    for chunk in np.array_split(xs, 7):
        merged.update_many(chunk)
    for m in (one, merged):
        assert m.n == 1001
        assert m.mean == pytest.approx(xs.mean(), rel=1e-12)
        assert m.variance == pytest.approx(xs.var(ddof=1), rel=1e-9)
    assert Moments().variance == 0.0


def test_paired_coverage_under_continuous_monitoring_normal() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(0.3, 1.0, (400, 2000))
    assert _paired_miss_rate(x, 0.3, t_opt=200) <= ALPHA + SLACK


def test_paired_coverage_under_continuous_monitoring_log_loss() -> None:
    rng = np.random.default_rng(12)
    truth = float(_log_loss_differences(np.random.default_rng(99), (1, 2_000_000)).mean())
    x = _log_loss_differences(rng, (400, 2000))
    assert _paired_miss_rate(x, truth, t_opt=200) <= ALPHA + SLACK


def test_fixed_horizon_interval_monitored_continuously_does_not_hold() -> None:
    """The reason for a confidence sequence: a 95 % fixed-sample interval looked at after every
    observation excludes the truth in far more than 5 % of runs (the test above can fail)."""
    rng = np.random.default_rng(13)
    x = rng.normal(0.0, 1.0, (400, 2000))
    n = np.arange(1, x.shape[1] + 1)
    mean = np.cumsum(x, 1) / n
    var = (np.cumsum(x * x, 1) - n * mean * mean) / np.maximum(n - 1, 1)
    naive = 1.96 * np.sqrt(var / n)
    miss = float((np.abs(mean) > naive)[:, BURN_IN - 1 :].any(1).mean())
    assert miss > 3 * ALPHA


def test_unpaired_coverage_under_continuous_monitoring() -> None:
    """A canary on 20 % of the traffic, same loss distribution as the champion (truth 0)."""
    rng = np.random.default_rng(14)
    runs, steps = 300, 3000
    p = rng.beta(2, 8, (runs, steps))
    y = rng.random((runs, steps)) < p
    loss = -np.where(y, np.log(p), np.log(1 - p))
    arm = rng.random((runs, steps)) < 0.2

    def moments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = np.cumsum(mask, 1)
        nn = np.maximum(n, 1)
        mean = np.cumsum(loss * mask, 1) / nn
        var = (np.cumsum(loss * loss * mask, 1) - nn * mean * mean) / np.maximum(nn - 1, 1)
        return n, mean, np.maximum(var, 1e-12)

    nc, mc, vc = moments(arm)
    nb, mb, vb = moments(~arm)
    v = vc / np.maximum(nc, 1) + vb / np.maximum(nb, 1)
    width = half_width(v, rho_squared(ALPHA, 200) * (vc + vb) / v, ALPHA)
    watched = (nc >= BURN_IN) & (nb >= BURN_IN)
    miss = float(((np.abs(mc - mb) > width) & watched).any(1).mean())
    assert miss <= ALPHA + SLACK


def test_paired_class_matches_the_boundary_and_detects_a_difference() -> None:
    rng = np.random.default_rng(3)
    cand, champ = rng.normal(0.6, 1, 500), rng.normal(0.4, 1, 500)
    seq = PairedSequence(ALPHA, t_opt=200)
    assert seq.interval() is None
    seq.update_many(cand[:10], champ[:10])
    for c, b in zip(cand[10:], champ[10:], strict=True):
        seq.update(float(c), float(b))
    iv = seq.interval()
    assert iv is not None and iv.n == iv.n_champion == 500
    d = cand - champ
    w = math.sqrt(
        2
        * d.var(ddof=1)
        / 500
        * (500 * rho_squared(ALPHA, 200) + 1)
        / (500 * rho_squared(ALPHA, 200))
        * math.log(math.sqrt(500 * rho_squared(ALPHA, 200) + 1) / ALPHA)
    )
    assert iv.estimate == pytest.approx(d.mean())
    assert iv.upper - iv.estimate == pytest.approx(w)
    assert iv.lower > 0  # a true difference of 0.2 with sd ~1.4 over 500 pairs is found


def test_unpaired_class_equal_counts_equals_paired_width_and_shrinks() -> None:
    rng = np.random.default_rng(4)
    seq = UnpairedSequence(ALPHA, t_opt=100)
    widths = []
    for i in range(2000):
        seq.update_candidate(float(rng.normal()))
        seq.update_champion(float(rng.normal()))
        if i in (99, 499, 1999):
            iv = seq.interval()
            assert iv is not None
            widths.append(iv.upper - iv.lower)
    assert widths[0] > widths[1] > widths[2]
    iv = seq.interval()
    assert iv is not None and iv.n == iv.n_champion == 2000
    c, b = seq.candidate, seq.champion
    v = c.variance / c.n + b.variance / b.n
    tau = 2000 * rho_squared(ALPHA, 100) * (c.variance + b.variance) / (c.variance + b.variance)
    assert iv.upper - iv.estimate == pytest.approx(float(half_width(v, tau, ALPHA)))
    assert iv.lower < 0 < iv.upper


def test_rho_is_tightest_near_t_opt() -> None:
    widths = {t: float(half_width(1 / 1000, 1000 * rho_squared(ALPHA, t), ALPHA)) for t in (50, 1000, 20000)}
    assert widths[1000] < widths[50] and widths[1000] < widths[20000]
