"""Concept drift on the error stream: per-event losses of labelled predictions fed to river's detectors.

A model whose inputs look as they always did can still go wrong when what they mean changes (the
labels' relation to the inputs). The loss of each labelled prediction is the signal: the judge
(:mod:`streams.judge`) feeds one :class:`ConceptMonitor` per model version with the loss of every
champion prediction whose label arrives. The monitor runs river's ``ADWIN`` (adaptive window) and
``PageHinkley`` (cumulative deviation, upward only) side by side and reports a :class:`ConceptChange` when
either fires on a *rise* of the loss (ADWIN's direction: the mean it dropped against the mean it kept; a
fall is the model getting better, not an alarm). The change point is placed where the loss most clearly
rose (the CUSUM estimate) within the window ADWIN held before its cut, or for PageHinkley within the
losses since the monitor last started (at most :data:`HISTORY`): ADWIN's own cut lies on a bucket
boundary, often hundreds of records early. The change carries the mean loss before and after that point
and the delay: records from it to the alarm. After an alarm both detectors start afresh and the monitor
keeps quiet for ``cooldown`` records. When ADWIN finds the loss *fell* (a learner learning, a better
version answering), the monitor starts over at the new level (fresh detectors and scale): otherwise
PageHinkley's running mean, and the scale, would still hold the worse past, and a later rise back to a
level below it would go unseen (a model's first, untrained answers did that).

Defaults are tuned on ``make bench-drift`` (``bench/drift.py``: river's synthetic streams and the
examples' generators with known change points, online learners' per-event losses): ADWIN at river's
default confidence, so the monitor is as fast as ADWIN alone on a rise, and PageHinkley with a tolerance
(``ph_delta`` 0.01) and threshold (100) high enough to keep drift-free streams of learners' 0/1 errors
under one false alarm per 100k records (river's defaults, 0.005 and 50, raised about 5 per 100k there).

**Scale.** Both detectors are tuned for losses in [0, 1] (0/1 errors, Brier scores), whose standard
deviation is at most 0.5; PageHinkley's tolerance and threshold, and the range term of ADWIN's bound,
are in the loss's units. A loss without that bound (a regressor's squared error in squared minutes, a
log loss) would make them fire on noise, so the monitor holds its first ``min_records`` losses, takes
their standard deviation, and feeds the detectors every loss divided by ``max(1, sd / 0.5)``: a loss
that spreads no wider than a [0, 1] one is fed as it is (the tuning above holds unchanged), a wider one
is brought to that spread, and the alarms of a loss and of the same loss in other units are the same.
Estimates and change points are reported in the loss's own units.

Detectors are river's own; what is Tide's is the one-sidedness, the scale, the change-point estimates
and the cool-down.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from river import drift

ADWIN, PAGE_HINKLEY = "adwin", "page_hinkley"
HISTORY = 20_000  # losses kept since the last reset, to place the change point when a detector fires
UNIT_SPREAD = 0.5  # the largest standard deviation of a loss in [0, 1] (module docstring: scale)


@dataclass(frozen=True)
class ConceptChange:
    """A rise of the loss one detector found: its name, mean loss before and after the estimated change
    point, records from that change point to the alarm, and records the monitor had seen when it fired."""

    detector: str
    estimate_before: float
    estimate_after: float
    delay_records: int
    seen: int


class ConceptMonitor:
    """ADWIN and PageHinkley on one error stream (see the module docstring).

    ``delta``: ADWIN's confidence (river's default 0.002); ``threshold``: PageHinkley's (in units of a
    [0, 1] loss; None leaves PageHinkley out) and ``ph_delta`` its tolerated drift per record;
    ``cooldown``: records ignored after an alarm; ``min_records``: records before the first alarm may be
    raised, which also set the loss's scale.
    """

    # Monitors restored from checkpoints taken before losses were scaled go on unscaled.
    _scale: float | None = 1.0
    _warm: list[float] | tuple[()] = ()

    def __init__(
        self,
        *,
        delta: float = 0.002,
        threshold: float | None = 100.0,
        ph_delta: float = 0.01,
        cooldown: int = 500,
        min_records: int = 100,
    ) -> None:
        self._delta = delta
        self._threshold = threshold
        self._ph_delta = ph_delta
        self.cooldown = cooldown
        self.min_records = min_records
        self.seen = 0
        self._quiet_until = 0
        self._scale = None  # from the first min_records losses
        self._warm = []
        self._reset()

    def _reset(self) -> None:
        self._adwin = drift.ADWIN(delta=self._delta)
        self._ph = (
            drift.PageHinkley(threshold=self._threshold, delta=self._ph_delta, mode="up")
            if self._threshold is not None
            else None
        )
        self._n = 0  # records since the last reset
        self._sum = 0.0
        self._history: deque[float] = deque(maxlen=HISTORY)

    @property
    def mean(self) -> float:
        """Mean loss since the monitor last (re)started."""
        return self._sum / self._n if self._n else 0.0

    @property
    def scale(self) -> float | None:
        """What every loss is divided by before the detectors see it (None: still warming up)."""
        return self._scale

    def update(self, loss: float) -> ConceptChange | None:
        """Take one per-event loss; return a change when a detector found a rise of the loss."""
        self.seen += 1
        if self._scale is None:
            warm = self._warm
            assert isinstance(warm, list)
            warm.append(loss)
            if len(warm) < self.min_records:
                return None
            spread = float(np.std(warm)) if len(warm) > 1 else 0.0
            self._scale = max(1.0, spread / UNIT_SPREAD) if np.isfinite(spread) else 1.0
            self._warm = []
            for held in warm[:-1]:
                self._feed(held)
        return self._check(*self._feed(loss))

    def _feed(self, loss: float) -> tuple[float, int, float]:
        """The loss, scaled, to both detectors; returns it scaled, and ADWIN's width and mean before it."""
        scaled = loss / (self._scale or 1.0)
        before_width = int(self._adwin.width)
        before_mean = self._adwin.estimation if before_width else 0.0
        self._adwin.update(scaled)
        if self._ph is not None:
            self._ph.update(scaled)
        self._n += 1
        self._sum += loss
        self._history.append(loss)
        return scaled, before_width, before_mean

    def _check(self, scaled: float, before_width: int, before_mean: float) -> ConceptChange | None:
        if self.seen < self.min_records:
            return None
        rose = fell = False
        if self._adwin.drift_detected:
            # ADWIN's direction: the mean of what it dropped against the mean of what it kept.
            kept = int(self._adwin.width)
            dropped = before_width + 1 - kept
            after = self._adwin.estimation
            if dropped > 0:
                rose = after > (before_mean * before_width + scaled - after * kept) / dropped
                fell = not rose
        if fell:
            # The model got better (a learner learning, a better version): a new level to watch from.
            # PageHinkley's mean and the scale still hold the worse past, so the monitor starts over.
            self._scale, self._warm = None, []
            self._reset()
            return None
        if self.seen < self._quiet_until:
            return None
        fired: str | None = None
        span = len(self._history)
        if rose:
            fired, span = ADWIN, before_width + 1  # the change lies in the window ADWIN held
        if fired is None and self._ph is not None and self._ph.drift_detected:
            fired = PAGE_HINKLEY  # one-sided (mode "up") already
        if fired is None:
            return None
        recent = list(self._history)[-span:]
        rise = _rise(np.asarray(recent, dtype=float))
        if rise is None:
            return None
        before, after, since = rise
        self._quiet_until = self.seen + self.cooldown
        self._reset()
        return ConceptChange(fired, before, after, since, self.seen)


def _rise(losses: np.ndarray) -> tuple[float, float, int] | None:
    """Where the loss most clearly rose in ``losses``: the split maximising the standardised rise of the
    mean (the CUSUM change-point estimate), as (mean before, mean after, records after); None when no
    split has a higher mean after than before. The detectors say *that* the loss changed; this says
    *where*, so the delay reported is the records from that point to the alarm."""
    n = len(losses)
    if n < 2:
        return None
    k = np.arange(1, n)
    total = losses.sum()
    head = np.cumsum(losses)[:-1]
    before = head / k
    after = (total - head) / (n - k)
    score = (after - before) * np.sqrt(k * (n - k) / n)
    best = int(np.argmax(score))
    if score[best] <= 0:
        return None
    return float(before[best]), float(after[best]), int(n - k[best])
