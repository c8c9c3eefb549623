"""Guardrails of a candidate version, read from the prediction log (labels not needed).

Every prediction of the candidate, and every champion prediction made while it is judged, feeds one
:class:`Guardrails`. Three checks, each needing at least ``MIN_PREDICTIONS`` predictions on each side
that takes part:

- ``error_rate``: the share of the candidate's predictions whose output could not be scored
  (:func:`streams.outcomes.output_error`). Breached when the Clopper-Pearson lower bound of that share
  (confidence ``1 - GUARD_ALPHA``, scipy's beta quantile) is above ``max_error_rate``: the judge looks
  after every batch, so a handful of errors early on must not fail a candidate by chance.
- ``latency_ratio``: the candidate's p99 latency over the champion's, both over their last ``window``
  predictions; breached above ``max_latency_ratio``.
- ``score_shift``: the two-sample Kolmogorov-Smirnov statistic (scipy.stats.ks_2samp) between the
  candidate's and the champion's last ``window`` scores; breached when above ``max_score_shift`` and
  significant at ``GUARD_ALPHA``.

Windows are bounded deques of plain floats, so the state snapshots cheaply.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from schemas.policy import Canary

MIN_PREDICTIONS = 200
GUARD_ALPHA = 1e-3
WINDOW = 2000


@dataclass
class ArmWindow:
    """One side's predictions: counts and the last ``window`` latencies and scores."""

    window: int = WINDOW
    n: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=deque)
    scores: deque[float] = field(default_factory=deque)

    def observe(self, score: float, latency_ms: float, error: bool) -> None:
        self.n += 1
        if error:
            self.errors += 1
        else:
            self.scores.append(score)
            if len(self.scores) > self.window:
                self.scores.popleft()
        self.latencies.append(latency_ms)
        if len(self.latencies) > self.window:
            self.latencies.popleft()

    def p99(self) -> float:
        return float(np.percentile(np.fromiter(self.latencies, float), 99)) if self.latencies else 0.0


@dataclass
class Guardrails:
    """The candidate's and the champion's prediction windows since the candidate's judgement began."""

    candidate: ArmWindow = field(default_factory=ArmWindow)
    champion: ArmWindow = field(default_factory=ArmWindow)

    def values(self) -> dict[str, float]:
        """What is measured so far (the verdict's ``guardrails``): only the parts with enough data."""
        c, b = self.candidate, self.champion
        out: dict[str, float] = {}
        if c.n:
            out["error_rate"] = c.errors / c.n
            out["predictions"] = float(c.n)
        if c.latencies:
            out["latency_p99_ms"] = c.p99()
        if len(c.latencies) >= MIN_PREDICTIONS and len(b.latencies) >= MIN_PREDICTIONS:
            out["champion_latency_p99_ms"] = b.p99()
            out["latency_ratio"] = out["latency_p99_ms"] / max(out["champion_latency_p99_ms"], 1e-3)
        if len(c.scores) >= MIN_PREDICTIONS and len(b.scores) >= MIN_PREDICTIONS:
            ks = stats.ks_2samp(np.fromiter(c.scores, float), np.fromiter(b.scores, float))
            out["score_shift"] = float(ks.statistic)
            out["score_shift_p"] = float(ks.pvalue)
        return out

    def breached(self, policy: Canary, values: dict[str, float] | None = None) -> str | None:
        """The first guardrail breached (``error_rate``, ``latency_ratio``, ``score_shift``), or None."""
        v = self.values() if values is None else values
        c = self.candidate
        if c.n >= MIN_PREDICTIONS and c.errors:
            lower = float(stats.beta.ppf(GUARD_ALPHA, c.errors, c.n - c.errors + 1))
            if lower > policy.max_error_rate:
                return "error_rate"
        if v.get("latency_ratio", 0.0) > policy.max_latency_ratio:
            return "latency_ratio"
        if v.get("score_shift", 0.0) > policy.max_score_shift and v.get("score_shift_p", 1.0) < GUARD_ALPHA:
            return "score_shift"
        return None
