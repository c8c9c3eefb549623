"""What the loop does on its own for one model: how canaries are judged, how drift is watched, when a
model is retrained and what a new version must show before it may serve.

A model declares it with ``Model(..., policy=Policy(...))``; every field has a default, so a model without
a policy is judged, watched and blessed with them and only *reports*: nothing is promoted, rolled back or
retrained automatically until the policy says so (``Canary(promote=True, rollback=True)``,
``Retrain(on=("concept", "drift"))``). Changing a policy is additive (:mod:`tide.diff`): it takes effect
on the next records the processors read, without retraining or recomputing anything.

- :class:`Canary` — the judge (``tide judge``): per-event losses of the candidate against the champion,
  paired for a shadow (same requests), unpaired for a canary (its sticky share); an always-valid
  confidence sequence at level ``alpha`` on the difference in mean loss, decided against the
  non-inferiority ``margin`` once ``min_labels`` and ``min_duration_s`` are reached; guardrails from the
  prediction log (error rate, latency p99 against the champion's, score distribution against the
  champion's). ``promote`` / ``rollback`` say whether a pass / fail publishes the deployment itself.
- :class:`Drift` — the drift scorer (``tide drift``) and the concept-drift detectors on the error
  stream: thresholds calibrated on the reference for ``false_alarm_rate`` per check, re-armed after
  ``cooldown_checks`` checks below the threshold.
- :class:`Retrain` — which alerts trigger a retraining (``on``: ``"drift"``, ``"concept"``), at most one
  per ``min_interval_s``; the blessing rule a candidate must pass against the champion on the same
  recent ``window`` of labelled examples: its metric at least ``min_value`` (when set) and no worse than
  the champion's by more than ``max_regression`` (TFX Evaluator's value and change thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from infra.errors import DefinitionError

TRIGGERS = frozenset({"drift", "concept"})


def _check_number(
    owner: object, where: str, name: str, low: float, high: float, *, integer: bool = False
) -> None:
    value = getattr(owner, name)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise DefinitionError(f"{where}, field {name!r}: must be {kind} in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class Canary:
    """How the judge decides a canary or shadow version (see the module docstring)."""

    margin: float = 0.01
    alpha: float = 0.05
    min_labels: int = 200
    min_duration_s: float = 30.0
    max_duration_s: float = 3600.0
    promote: bool = False
    rollback: bool = False
    max_error_rate: float = 0.01
    max_latency_ratio: float = 3.0
    max_score_shift: float = 0.25

    def check(self, where: str) -> None:
        _check_number(self, where, "margin", 0.0, math.inf)
        _check_number(self, where, "alpha", 1e-9, 0.5)
        _check_number(self, where, "min_labels", 1, 2**31 - 1, integer=True)
        _check_number(self, where, "min_duration_s", 0.0, math.inf)
        _check_number(self, where, "max_duration_s", self.min_duration_s, math.inf)
        _check_number(self, where, "max_error_rate", 0.0, 1.0)
        _check_number(self, where, "max_latency_ratio", 1.0, math.inf)
        _check_number(self, where, "max_score_shift", 0.0, math.inf)
        for name in ("promote", "rollback"):
            if not isinstance(getattr(self, name), bool):
                raise DefinitionError(f"{where}, field {name!r}: must be true or false")


@dataclass(frozen=True)
class Drift:
    """How drift is watched for one model (see the module docstring)."""

    false_alarm_rate: float = 1e-5
    cooldown_checks: int = 10
    concept: bool = True

    def check(self, where: str) -> None:
        _check_number(self, where, "false_alarm_rate", 1e-12, 0.1)
        _check_number(self, where, "cooldown_checks", 0, 10**9, integer=True)
        if not isinstance(self.concept, bool):
            raise DefinitionError(f"{where}, field 'concept': must be true or false")


@dataclass(frozen=True)
class Retrain:
    """What triggers a retraining and what its candidate must show (see the module docstring)."""

    on: tuple[str, ...] = ()
    min_interval_s: float = 300.0
    window: int = 2000
    min_value: float | None = None
    max_regression: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "on", tuple(self.on) if not isinstance(self.on, str) else (self.on,))

    def check(self, where: str) -> None:
        for i, trigger in enumerate(self.on):
            if trigger not in TRIGGERS:
                raise DefinitionError(
                    f"{where}, field 'on[{i}]': {trigger!r} is not one of {sorted(TRIGGERS)}"
                )
        _check_number(self, where, "min_interval_s", 0.0, math.inf)
        _check_number(self, where, "window", 10, 10**9, integer=True)
        if self.min_value is not None:
            _check_number(self, where, "min_value", -math.inf, math.inf)
        _check_number(self, where, "max_regression", 0.0, math.inf)


@dataclass(frozen=True)
class Policy:
    """A model's loop policy: :class:`Canary`, :class:`Drift` and :class:`Retrain`."""

    canary: Canary = field(default_factory=Canary)
    drift: Drift = field(default_factory=Drift)
    retrain: Retrain = field(default_factory=Retrain)

    def check(self, where: str) -> None:
        for name, kind in (("canary", Canary), ("drift", Drift), ("retrain", Retrain)):
            part = getattr(self, name)
            if not isinstance(part, kind):
                raise DefinitionError(
                    f"{where}, field 'policy.{name}': must be a {kind.__name__}, got {part!r}"
                )
            part.check(f"{where}, policy.{name}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["retrain"]["on"] = list(self.retrain.on)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Policy:
        if not d:
            return cls()
        parts: dict[str, Any] = {}
        for name, kind in (("canary", Canary), ("drift", Drift), ("retrain", Retrain)):
            known = {f.name for f in fields(kind)}
            given = d.get(name) or {}
            if unknown := sorted(set(given) - known):
                raise DefinitionError(f"policy.{name}: unknown fields {unknown}")
            parts[name] = kind(**given)
        return cls(**parts)
