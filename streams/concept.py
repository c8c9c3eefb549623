"""Concept drift on the error stream: per-event losses of labelled predictions fed to river's detectors.

A model whose inputs look as they always did can still go wrong when what they mean changes (the
labels' relation to the inputs). The loss of each labelled prediction is the signal: the judge
(:mod:`streams.judge`) feeds one :class:`ConceptMonitor` per model version with the loss of every
champion prediction whose label arrives. The monitor runs river's ``ADWIN`` (adaptive window; its cut is
the change point) and ``PageHinkley`` (cumulative deviation, upward only) side by side and reports a
:class:`ConceptChange` when either fires on a *rise* of the loss (a fall is the model getting better, not
an alarm), with the mean loss before and after the change and the delay in records since the change
point. After an alarm the monitor keeps quiet for ``cooldown`` records (hysteresis), then starts again.

Detectors are river's own; what is Tide's is the one-sidedness, the estimates and the cool-down.
"""

from __future__ import annotations

from dataclasses import dataclass

from river import drift

ADWIN, PAGE_HINKLEY = "adwin", "page_hinkley"


@dataclass(frozen=True)
class ConceptChange:
    """A rise of the loss one detector found: its name, mean loss before and after, records since the
    estimated change point, and records the monitor had seen when it fired."""

    detector: str
    estimate_before: float
    estimate_after: float
    delay_records: int
    seen: int


class ConceptMonitor:
    """ADWIN and PageHinkley on one error stream (see the module docstring).

    ``delta``: ADWIN's confidence (river's default 0.002); ``threshold``: PageHinkley's (in units of the
    loss; None leaves PageHinkley out); ``cooldown``: records ignored after an alarm; ``min_records``:
    records before the first alarm may be raised.
    """

    def __init__(
        self,
        *,
        delta: float = 0.002,
        threshold: float | None = 50.0,
        cooldown: int = 500,
        min_records: int = 100,
    ) -> None:
        self._delta = delta
        self._threshold = threshold
        self.cooldown = cooldown
        self.min_records = min_records
        self.seen = 0
        self._quiet_until = 0
        self._reset()

    def _reset(self) -> None:
        self._adwin = drift.ADWIN(delta=self._delta)
        self._ph = (
            drift.PageHinkley(threshold=self._threshold, mode="up") if self._threshold is not None else None
        )
        self._n = 0  # records since the last reset
        self._sum = 0.0

    @property
    def mean(self) -> float:
        """Mean loss since the monitor last (re)started."""
        return self._sum / self._n if self._n else 0.0

    def update(self, loss: float) -> ConceptChange | None:
        """Take one per-event loss; return a change when a detector found a rise of the loss."""
        self.seen += 1
        before_width = self._adwin.width
        before_mean = self._adwin.estimation if before_width else 0.0
        self._adwin.update(loss)
        if self._ph is not None:
            self._ph.update(loss)
        self._n += 1
        self._sum += loss
        if self.seen < max(self._quiet_until, self.min_records):
            return None
        change: ConceptChange | None = None
        if self._adwin.drift_detected:
            after = self._adwin.estimation  # the window kept: the records since the cut
            kept = int(self._adwin.width)
            dropped = before_width + 1 - kept
            if dropped > 0 and after > (before_mean * before_width + loss - after * kept) / dropped:
                before = (before_mean * before_width + loss - after * kept) / dropped
                change = ConceptChange(ADWIN, before, after, kept, self.seen)
        if change is None and self._ph is not None and self._ph.drift_detected:
            change = ConceptChange(PAGE_HINKLEY, self.mean, loss, 0, self.seen)
        if change is not None:
            self._quiet_until = self.seen + self.cooldown
            self._reset()
        return change
