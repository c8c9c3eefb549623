"""The population stability index of a sliding window of live values against a reference histogram:
the detector the drift scorer (:mod:`streams.drift`) keeps per watched input and model output."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from infra.errors import StreamError
from models.profile import psi


class PsiDriftDetector:
    """PSI of a sliding window of live values against a reference histogram, with hysteresis.

    ``histogram_ref`` is a :class:`~schemas.records.Histogram` as built by
    :func:`models.profile.histogram`: ``len(edges) + 1`` bins, bin ``i`` holding the values in
    ``(edges[i-1], edges[i]]``. The window keeps the raw values, so a detector built on another reference
    can be seeded with them. ``update`` is O(log bins); ``statistic`` is O(bins).

    ``drift_detected`` is the alarm level: it turns on when the window is full and the PSI exceeds
    ``threshold``, and off again only once the PSI has fallen below ``threshold * rearm_ratio``.
    ``check`` evaluates the same and returns True only on a rising edge, once per alarm.
    """

    def __init__(
        self, histogram_ref: Mapping[str, Any], window: int, threshold: float, rearm_ratio: float = 0.5
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if threshold <= 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        if not 0 <= rearm_ratio <= 1:
            raise ValueError(f"rearm_ratio must be in [0, 1], got {rearm_ratio}")
        name = histogram_ref.get("name", "?")
        edges = [float(e) for e in histogram_ref["edges"]]
        counts = [int(c) for c in histogram_ref["counts"]]
        if len(counts) != len(edges) + 1:
            raise StreamError(
                f"reference histogram {name!r} has {len(edges)} edges and {len(counts)} counts; "
                "expected one count more than edges"
            )
        if any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in pairwise(edges)):
            raise StreamError(f"reference histogram {name!r}: edges must be finite and strictly ascending")
        if any(c < 0 for c in counts) or sum(counts) == 0:
            raise StreamError(f"reference histogram {name!r}: counts must be non-negative, not all zero")
        self.name: str = str(name)
        self.window = window
        self.threshold = threshold
        self.rearm_ratio = rearm_ratio
        self._edges = edges
        self._reference = counts
        self._live = [0] * len(counts)
        self._values: deque[float] = deque()
        self._alarm = False
        self._reported = False

    @property
    def reference_size(self) -> int:
        return sum(self._reference)

    @property
    def n(self) -> int:
        """How many live values the window holds (at most ``window``)."""
        return len(self._values)

    @property
    def window_full(self) -> bool:
        return len(self._values) == self.window

    def live_values(self) -> list[float]:
        """The values in the window, oldest first (to seed a detector built on another reference)."""
        return list(self._values)

    def update(self, value: float) -> None:
        """Push one live value; the oldest leaves once the window is full. NaN is ignored."""
        if math.isnan(value):
            return
        if len(self._values) == self.window:
            self._live[bisect.bisect_left(self._edges, self._values.popleft())] -= 1
        self._values.append(value)
        self._live[bisect.bisect_left(self._edges, value)] += 1

    @property
    def statistic(self) -> float:
        """PSI of the live window against the reference (0.0 while the window is empty)."""
        if not self._values:
            return 0.0
        return psi(self._reference, self._live)

    def _evaluate(self) -> float:
        value = self.statistic
        if self._alarm:
            if value < self.threshold * self.rearm_ratio:
                self._alarm = False
                self._reported = False
        elif self.window_full and value > self.threshold:
            self._alarm = True
        return value

    @property
    def drift_detected(self) -> bool:
        """True while in drift: from a PSI above the threshold until it falls below the re-arm level."""
        self._evaluate()
        return self._alarm

    def check(self) -> bool:
        """Evaluate now; True only the first time an alarm is seen (the rising edge)."""
        self._evaluate()
        if self._alarm and not self._reported:
            self._reported = True
            return True
        return False
