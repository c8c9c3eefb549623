"""The judge's state per model and what it publishes: candidates under judgement, the join, concept
monitors; verdict, deployment and concept-drift records (the step is :mod:`streams.judge`).

**Concept monitors follow a lineage, not a version.** One :class:`streams.concept.ConceptMonitor` per
*chain* of champion versions: a version continues the chain of its ``parent_version`` (an online learner
publishing every few labels, a scheduled retrain), so the detector sees the champion's error stream
without a break across publications, and an alert names the version whose loss fired it; a version
whose ``trigger`` names a drift alert (a refresh or retrain after drift, :func:`chain_of`) starts a chain
of its own, with a fresh monitor. The step keeps each version's chain (:class:`streams.judge.JudgeStep`)
and passes it to :meth:`ModelState.joined`.

All of it is plain data (pickled into the judge's checkpoints) and broker-free: records go to an
:class:`Emitter`, which the service binds to its transactional producer and tests to memory.

Ids are derived, not drawn: a verdict's id from its candidate (model, arm, version, when its judgement
began) and its place among that candidate's verdicts (``final`` for the final one), an alert's from its
model version and its place among that version's alerts, a deployment's from its verdict. A judge that
restarts from its checkpoint and publishes again what a failed transaction held gives the same ids, so a
reader that keys by id sees each once even on a broker that shows records of aborted transactions (the
embedded one does).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from infra.letters import DeadLetter
from schemas import codec
from schemas.definitions import Labels, Model, Project, Source
from schemas.records import CanaryVerdict, Deployment, DriftAlert
from streams.concept import ConceptChange, ConceptMonitor
from streams.outcomes import Joined, Joins, Scored, concept_signal
from streams.verdict import CANARY, FAIL, PASS, SHADOW, Decision, Judgement

log = logging.getLogger(__name__)

CHAMPION = "champion"
CANDIDATE_ARMS = (CANARY, SHADOW)
MAX_CANDIDATES = 8  # candidates judged at once per model (the oldest ends beyond it)
MAX_FINISHED = 256  # finished candidates remembered per model (their later predictions are ignored)
MONITORS_PER_MODEL = 8  # concept monitors (chains of champion versions) kept per model
SOURCE = "judge"

VERDICTS = Counter("tide_judge_verdicts_total", "Verdicts published", ["model", "outcome", "final"])
CONCEPT_ALERTS = Counter("tide_judge_concept_alerts_total", "Concept-drift alerts raised", ["model"])


_ALERT_TRIGGER = re.compile(r"^\w+ drift alert \S+$")  # what a version made for an alert records


def chain_of(record: Mapping[str, Any], chains: Mapping[int, int]) -> int:
    """The chain (its first version) a ``model_version`` record joins, given the model's ``chains`` so
    far (version -> chain): its parent's, unless it has none or answers a drift alert (module
    docstring)."""
    version, parent = int(record["version"]), record.get("parent_version")
    if parent is None or int(parent) == version or _ALERT_TRIGGER.match(str(record.get("trigger") or "")):
        return version
    return chains.get(int(parent), int(parent))


def judged_models(project: Project) -> dict[str, Model]:
    """The models of ``project`` the judge can judge: those with labels."""
    return {name: m for name, m in project.models.items() if m.labels is not None}


class Emitter:
    """Where the judge's records go. Subclasses implement :meth:`produce` and :meth:`dead_letter`."""

    def __init__(self, verdicts: str, deployments: str, alerts: str) -> None:
        self.verdicts, self.deployments, self.alerts = verdicts, deployments, alerts

    def produce(self, topic_name: str, value: bytes, key: bytes) -> None:
        raise NotImplementedError

    def dead_letter(self, letter: DeadLetter) -> None:
        raise NotImplementedError

    def verdict(self, record: CanaryVerdict) -> None:
        self.produce(self.verdicts, codec.encode("canary_verdict", record), record["model"].encode())

    def deployment(self, record: Deployment) -> None:
        self.produce(self.deployments, codec.encode("deployment", record), record["model"].encode())

    def alert(self, record: DriftAlert) -> None:
        self.produce(self.alerts, codec.encode("drift_alert", record), record["model"].encode())


@dataclass
class MemoryEmitter(Emitter):
    """Keeps what is emitted, decoded (unit tests, the benchmark)."""

    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__("canary-verdicts", "deployments", "drift-alerts")

    def produce(self, topic_name: str, value: bytes, key: bytes) -> None:
        self.records.append((topic_name, codec.decode(value)))

    def dead_letter(self, letter: DeadLetter) -> None:
        self.letters.append(letter)

    def of(self, topic_name: str) -> list[dict[str, Any]]:
        return [r for t, r in self.records if t == topic_name]


@dataclass
class ModelState:
    """One judged model: its definition, join, candidates and concept monitors."""

    model: Model
    joins: Joins
    judgements: dict[tuple[str, int], Judgement] = field(default_factory=dict)
    finished: dict[tuple[str, int], int] = field(default_factory=dict)  # -> when (stream ms)
    monitors: dict[int, ConceptMonitor] = field(default_factory=dict)  # by chain (module docstring)
    alerts: dict[int, int] = field(default_factory=dict)  # version -> concept alerts raised
    champion_version: int = 0
    served_ms: int = 0  # the newest prediction of the model read (0: none yet)
    not_served: int = 0  # labels not held: no prediction of the model near their time

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"served_ms": 0, "not_served": 0} | state)  # checkpoints of older versions

    @classmethod
    def of(cls, model: Model, max_pending: int) -> ModelState:
        assert model.labels is not None
        return cls(model, Joins(model.task, model.labels.max_delay_ms, max_pending))

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def labels(self) -> Labels:
        assert self.model.labels is not None
        return self.model.labels

    @property
    def labels_source(self) -> Source:
        return self.labels.source

    def redefine(self, model: Model, max_pending: int) -> None:
        """Take a new definition: policy changes apply to candidates being judged (their statistics keep
        the level they were started with)."""
        self.model = model
        self.joins.task, self.joins.max_pending = model.task, max_pending
        self.joins.ttl_ms = self.labels.max_delay_ms
        for j in self.judgements.values():
            j.policy = model.policy.canary

    # -- candidates ------------------------------------------------------------------------------------

    def start(self, arm: str, version: int, now_ms: int) -> Judgement | None:
        """The candidate's judgement, begun at ``now_ms`` (the time of the record that started it) if it
        is not under way; None when already finished."""
        key = (arm, version)
        found = self.judgements.get(key)
        if found is not None or key in self.finished:
            return found
        j = Judgement(self.name, arm, version, self.model.policy.canary, now_ms, self.champion_version)
        self.judgements[key] = j
        log.info(
            "model %s: judging %s v%d against champion v%d", self.name, arm, version, self.champion_version
        )
        while len(self.judgements) > MAX_CANDIDATES:
            oldest = next(iter(self.judgements))
            self.judgements.pop(oldest)
            self._finish(oldest, now_ms)
        return j

    def restart(self, arm: str, version: int, now_ms: int, published_ms: int) -> None:
        """A deployment published at ``published_ms`` starts the candidate: a judgement of it finished
        before then starts over (one finished after it was of this very deployment: read late)."""
        if self.finished.get((arm, version), published_ms) < published_ms:
            del self.finished[(arm, version)]
        self.start(arm, version, published_ms)

    def _finish(self, key: tuple[str, int], now_ms: int) -> None:
        self.finished[key] = now_ms
        while len(self.finished) > MAX_FINISHED:
            del self.finished[next(iter(self.finished))]

    def end(self, arm: str, version: int, now_ms: int, out: Emitter) -> None:
        """The candidate's deployment ended: its final verdict, when it had none."""
        j = self.judgements.pop((arm, version), None)
        if j is None:
            return
        self._publish(j, j.end(now_ms), now_ms, out)
        self._finish((arm, version), now_ms)

    # -- observations ------------------------------------------------------------------------------------

    def observe(self, arm: str, scored: Scored, latency_ms: float, now_ms: int) -> Judgement | None:
        """A prediction, for the guardrails. Returns the candidate's judgement (None: not judged)."""
        if arm == CHAMPION:
            self.champion_version = scored.version
            for j in self.judgements.values():
                j.guardrails.champion.observe(scored.score, latency_ms, scored.error)
            return None
        if arm not in CANDIDATE_ARMS:
            return None
        found = self.start(arm, scored.version, now_ms)
        if found is not None:
            found.guardrails.candidate.observe(scored.score, latency_ms, scored.error)
        return found

    def served_near(self, ts_ms: int) -> bool:
        """Whether a prediction of the model was read within the labels' ``max_delay`` before ``ts_ms``
        (or after it): a label of that time may meet one."""
        return self.served_ms > 0 and self.served_ms + self.joins.ttl_ms >= ts_ms

    def joined(self, joined: Joined, now_ms: int, out: Emitter, chain: int | None = None) -> None:
        """A labelled prediction: losses to the candidates' statistics and the concept monitor (of
        ``chain``, the lineage of the prediction's version; its version when not given)."""
        event, loss = joined.event, joined.loss
        if joined.arm == CHAMPION:
            if loss is not None:
                for j in self.judgements.values():
                    if j.arm == CANARY and event.first_ms >= j.started_ms:
                        j.champion_loss(loss)
                self._concept(joined, loss, now_ms, out, joined.version if chain is None else chain)
        elif joined.arm in CANDIDATE_ARMS:
            candidate = self.judgements.get((joined.arm, joined.version))
            if candidate is None:
                return
            candidate.labelled(now_ms)
            candidate.metric = candidate.metric or joined.metric
            if joined.arm == CANARY and loss is not None:
                candidate.candidate_loss(loss, now_ms)
        shadow = event.predictions.get(SHADOW)
        if shadow is not None and not event.paired and SHADOW in event.losses and CHAMPION in event.losses:
            event.paired = True
            paired = self.judgements.get((SHADOW, shadow.version))
            if paired is not None:
                paired.pair(event.losses[SHADOW], event.losses[CHAMPION], now_ms)

    def _concept(self, joined: Joined, loss: float, now_ms: int, out: Emitter, chain: int) -> None:
        if not self.model.policy.drift.concept:
            return
        monitor = self.monitors.pop(chain, None) or ConceptMonitor()
        self.monitors[chain] = monitor  # most recently used last
        while len(self.monitors) > MONITORS_PER_MODEL:
            del self.monitors[next(iter(self.monitors))]
        change = monitor.update(concept_signal(self.task, loss))
        if change is not None:
            seq = self.alerts[joined.version] = self.alerts.get(joined.version, 0) + 1
            alert = concept_alert(self.name, joined.version, change, joined.event_id, now_ms)
            alert["alert_id"] = derived_id("alert", self.name, joined.version, seq)
            out.alert(alert)
            CONCEPT_ALERTS.labels(self.name).inc()
            log.warning(
                "concept drift: model %s v%d (lineage from v%d) loss %.4f -> %.4f (%s, %d records since "
                "the change)",
                self.name,
                joined.version,
                chain,
                change.estimate_before,
                change.estimate_after,
                change.detector,
                change.delay_records,
            )

    # -- verdicts ------------------------------------------------------------------------------------------

    def decide(self, now_ms: int, every_ms: float, out: Emitter) -> None:
        """Apply the rules to every candidate: final verdicts (and actions), interim ones at the cadence."""
        for key, j in list(self.judgements.items()):
            d = j.decide(now_ms)
            if d.final:
                del self.judgements[key]
                self._finish(key, now_ms)
                self._publish(j, d, now_ms, out)
                continue
            progress = (j.stats.n, j.stats.n_champion, j.guardrails.candidate.n)
            if progress != j.reported and now_ms - j.last_interim_ms >= every_ms:
                j.reported, j.last_interim_ms = progress, now_ms
                self._publish(j, d, now_ms, out)

    def _publish(self, j: Judgement, d: Decision, now_ms: int, out: Emitter) -> None:
        j.champion_version = self.champion_version or j.champion_version  # the one it was compared with
        record = verdict_record(j, d, self.task, now_ms)
        j.published += 1
        place = "final" if d.final else j.published
        record["verdict_id"] = derived_id("verdict", j.model, j.arm, j.version, j.started_ms, place)
        deployment_id = derived_id("deployment", record["verdict_id"])
        action = None
        if d.final and d.outcome == PASS and j.policy.promote:
            action = "promote"
            why = f"canary verdict {record['verdict_id']}: pass ({d.rule})"
            out.deployment(deployment_record(j.model, "promote", j.version, why, deployment_id))
        elif d.final and d.outcome == FAIL and j.policy.rollback:
            action = "rollback"
            why = f"canary verdict {record['verdict_id']}: fail ({d.rule})"
            if j.arm == CANARY:
                out.deployment(deployment_record(j.model, "canary", j.version, why, deployment_id))
            else:
                out.deployment(deployment_record(j.model, "shadow", None, why, deployment_id))
        record["action"] = action
        out.verdict(record)
        VERDICTS.labels(j.model, d.outcome, str(d.final).lower()).inc()
        log.log(
            logging.WARNING if d.final else logging.INFO,
            "verdict %s: model %s %s v%d vs v%d: %s (%s)%s n=%d est=%s [%s, %s]%s",
            record["verdict_id"],
            j.model,
            j.arm,
            j.version,
            record["champion_version"],
            d.outcome,
            d.rule,
            " final" if d.final else "",
            record["n"],
            _fmt(record.get("estimate")),
            _fmt(record.get("lower")),
            _fmt(record.get("upper")),
            f", published {action}" if action else "",
        )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def default_metric(task: str) -> str:
    return "squared_error" if task == "regression" else "log_loss"


def verdict_record(j: Judgement, d: Decision, task: str, now_ms: int) -> CanaryVerdict:
    iv = d.interval
    return {
        "verdict_id": uuid.uuid4().hex,
        "model": j.model,
        "version": j.version,
        "champion_version": j.champion_version,
        "arm": j.arm,
        "outcome": d.outcome,
        "rule": d.rule,
        "metric": j.metric or default_metric(task),
        "estimate": iv.estimate if iv else None,
        "lower": iv.lower if iv else None,
        "upper": iv.upper if iv else None,
        "margin": float(j.policy.margin),
        "alpha": float(j.stats.alpha),
        "n": j.stats.n,
        "n_champion": j.stats.n_champion,
        "duration_ms": d.duration_ms,
        "guardrails": {k: float(v) for k, v in d.guardrails.items()},
        "action": None,
        "final": d.final,
        "ts": now_ms,
    }


def derived_id(*parts: object) -> str:
    """A stable id of what ``parts`` name (module docstring)."""
    return uuid.uuid5(uuid.NAMESPACE_OID, "tide.judge|" + "|".join(map(str, parts))).hex


def deployment_record(
    model: str, action: str, version: int | None, reason: str, deployment_id: str | None = None
) -> Deployment:
    """A deployment the judge publishes (``serving.deployments`` semantics: ``canary`` at weight 0 ends
    the canary, ``shadow`` without a version ends the shadow)."""
    return {
        "model": model,
        "action": action,
        "version": version,
        "weight": 0.0,
        "reason": reason,
        "id": deployment_id or uuid.uuid4().hex,
        "source": SOURCE,
        "ts": _wall_ms(),
    }


def concept_alert(model: str, version: int, change: ConceptChange, event_id: str, now_ms: int) -> DriftAlert:
    """A concept-drift alert: the detector's mean loss before and after the change it found."""
    return {
        "alert_id": uuid.uuid4().hex,
        "model": model,
        "version": version,
        "feature": "loss",
        "statistic": change.detector,
        "value": change.estimate_after,
        "threshold": change.estimate_before,
        "window_size": change.seen,
        "reference_size": max(change.seen - change.delay_records, 0),
        "trigger_event_id": event_id,
        "kind": "concept",
        "feature_type": None,
        "p_value": None,
        "false_alarm_rate": None,
        "estimate_before": change.estimate_before,
        "estimate_after": change.estimate_after,
        "delay_records": change.delay_records,
        "arm": CHAMPION,
        "ts": now_ms,
    }


def _wall_ms() -> int:
    return int(time.time() * 1000)
