"""The decision rules of the canary judge: one :class:`Judgement` per candidate version, pure and
broker-free (the judge and ``bench/canary.py`` run the same code).

``delta`` is the candidate's mean per-event loss minus the champion's (positive: the candidate is worse),
``[lower, upper]`` its always-valid confidence sequence at level ``alpha`` (:mod:`streams.sequential`),
``margin`` the non-inferiority margin. In order:

1. ``no_data`` (rule ``min_labels``) while the candidate has no labelled prediction;
2. before ``min_duration_s`` has passed: ``inconclusive`` (rule ``min_duration``);
3. a guardrail breached (:mod:`streams.guardrails`): ``fail`` (rule ``guardrail:<name>``) — guardrails
   need no labels, only ``min_duration_s``;
4. fewer than ``min_labels`` labels (each side, for a canary): ``inconclusive`` (rule ``min_labels``);
5. ``lower > 0`` (significantly worse): ``fail`` (rule ``inferiority``);
6. ``upper < margin`` (non-inferior): ``pass`` (rule ``non_inferiority``);
7. at ``max_duration_s``: ``inconclusive``, final (rule ``max_duration``); before it ``inconclusive``
   (rule ``undecided``).

``pass`` and ``fail`` are final; so is ``max_duration``. A candidate's deployment ending before a final
verdict gives a final one with rule ``ended`` (:meth:`Judgement.end`). Durations are in stream time (the
records' timestamps), so a replay after a crash decides exactly as the first run did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.policy import Canary
from streams.guardrails import Guardrails
from streams.sequential import Interval, PairedSequence, UnpairedSequence

PASS, FAIL, INCONCLUSIVE, NO_DATA = "pass", "fail", "inconclusive", "no_data"
SHADOW, CANARY = "shadow", "canary"


@dataclass(frozen=True)
class Decision:
    """What the rules say now: outcome, deciding rule, whether it is final, and what it was based on."""

    outcome: str
    rule: str
    final: bool
    interval: Interval | None
    duration_ms: int
    guardrails: dict[str, float]


def t_opt(policy: Canary) -> float:
    """Where the confidence sequence is tightest: at the labels a decision first becomes possible."""
    return float(policy.min_labels)


@dataclass
class Judgement:
    """One candidate (``arm`` canary or shadow, ``version``) of one model, against the champion."""

    model: str
    arm: str
    version: int
    policy: Canary
    started_ms: int
    champion_version: int = 0
    metric: str = ""
    first_label_ms: int | None = None
    last_interim_ms: int = 0
    final: bool = False
    published: int = 0  # verdicts published
    reported: tuple[int, int, int] = (-1, -1, -1)  # (n, n_champion, predictions) at the last interim
    stats: PairedSequence | UnpairedSequence = field(init=False)
    guardrails: Guardrails = field(default_factory=Guardrails)

    def __post_init__(self) -> None:
        self.stats = self.new_stats(self.policy)

    def new_stats(self, policy: Canary) -> PairedSequence | UnpairedSequence:
        kind = PairedSequence if self.arm == SHADOW else UnpairedSequence
        return kind(policy.alpha, t_opt(policy))

    # -- observations ----------------------------------------------------------------------------------

    def labelled(self, now_ms: int) -> None:
        if self.first_label_ms is None:
            self.first_label_ms = now_ms

    def pair(self, candidate_loss: float, champion_loss: float, now_ms: int) -> None:
        """A shadow's loss and the champion's on the same event."""
        assert isinstance(self.stats, PairedSequence)
        self.stats.update(candidate_loss, champion_loss)
        self.labelled(now_ms)

    def candidate_loss(self, loss: float, now_ms: int) -> None:
        assert isinstance(self.stats, UnpairedSequence)
        self.stats.update_candidate(loss)
        self.labelled(now_ms)

    def champion_loss(self, loss: float) -> None:
        assert isinstance(self.stats, UnpairedSequence)
        self.stats.update_champion(loss)

    # -- the rules ---------------------------------------------------------------------------------------

    def duration_ms(self, now_ms: int) -> int:
        return max(0, now_ms - self.started_ms)

    def decide(self, now_ms: int, *, check_guardrails: bool = True) -> Decision:
        """The rules of the module docstring at stream time ``now_ms``."""
        p = self.policy
        duration = self.duration_ms(now_ms)
        interval = self.stats.interval()
        guards = self.guardrails.values() if check_guardrails else {}
        timed_out = duration >= p.max_duration_s * 1000

        def decision(outcome: str, rule: str, final: bool = False) -> Decision:
            return Decision(outcome, rule, final, interval, duration, guards)

        if duration < p.min_duration_s * 1000:
            if self.stats.n == 0:
                return decision(NO_DATA, "min_labels")
            return decision(INCONCLUSIVE, "min_duration")
        breach = self.guardrails.breached(p, guards) if check_guardrails else None
        if breach is not None:
            return decision(FAIL, f"guardrail:{breach}", True)
        if self.stats.n == 0:
            return decision(NO_DATA, "max_duration" if timed_out else "min_labels", timed_out)
        if interval is None or min(self.stats.n, self.stats.n_champion) < p.min_labels:
            if timed_out:
                return decision(INCONCLUSIVE, "max_duration", True)
            return decision(INCONCLUSIVE, "min_labels")
        if interval.lower > 0.0:
            return decision(FAIL, "inferiority", True)
        if interval.upper < p.margin:
            return decision(PASS, "non_inferiority", True)
        if timed_out:
            return decision(INCONCLUSIVE, "max_duration", True)
        return decision(INCONCLUSIVE, "undecided")

    def end(self, now_ms: int) -> Decision:
        """The final verdict of a candidate whose deployment ended before the rules decided."""
        d = self.decide(now_ms)
        outcome = NO_DATA if self.stats.n == 0 else INCONCLUSIVE
        return Decision(outcome, "ended", True, d.interval, d.duration_ms, d.guardrails)
