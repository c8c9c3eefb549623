"""What a :class:`~serving.registry.ModelRegistry` knows of one model name, and how a deployment is
decided against it (applied, held for its version, or refused: :mod:`serving.ledger`). Guarded by the
registry's lock; plain data and logic, no I/O."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import Counter

from infra.errors import DeploymentError
from models.inputs import ModelInputs
from models.runtime import LoadedModel
from serving.deployments import TrafficPolicy
from serving.ledger import APPLIED, ASPECT, PENDING, REFUSED, SERVES_TRAFFIC, Ledger, Outcome
from serving.validation import RequestSchema

logger = logging.getLogger(__name__)

DEPLOYMENTS_APPLIED = Counter(
    "tide_deployments_applied_total", "Deployment actions applied", ["model", "action"]
)
DEPLOYMENTS_REFUSED = Counter(
    "tide_deployments_refused_total", "Deployment actions refused (not applied)", ["model", "action"]
)

# The inputs a version is scored with under the definitions served (serving.lineage.pinned_inputs bound
# to them); raises LineageMismatch.
Pin = Callable[[Mapping[str, Any]], ModelInputs]


@dataclass
class Source:
    """Where a record came from, for logs and dead letters."""

    topic: str
    partition: int
    offset: int
    payload: bytes = b""

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass
class ModelState:
    """Everything the registry knows of one model name. Guarded by the registry's lock."""

    policy: TrafficPolicy = field(default_factory=TrafficPolicy)
    records: dict[int, tuple[Mapping[str, Any], Source | None]] = field(default_factory=dict)
    loaded: dict[int, LoadedModel] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    # Versions whose lineage does not fit the definitions (the reason): reconsidered when they change.
    refused: dict[int, str] = field(default_factory=dict)
    newest: int | None = None  # newest version published that has not failed to load nor been refused
    pins: dict[int, ModelInputs] = field(default_factory=dict)  # loaded version -> its inputs
    schema: RequestSchema | None = None  # of the model's definition (None: a registry without one)
    pin: Pin | None = None
    # Versions published unblessed (the reason): never champion under follow (serving.ledger).
    unblessed: dict[int, str] = field(default_factory=dict)
    ledger: Ledger = field(default_factory=Ledger)

    def serving_version(self) -> int | None:
        return self.policy.champion if self.policy.champion is not None else self.newest

    def usable_newest(self) -> int | None:
        usable = [v for v in self.records if v not in self.failed and v not in self.refused]
        return max([v for v in (*usable, *self.loaded) if v not in self.unblessed], default=None)

    def status_of(self, version: int, champion: int | None) -> tuple[str, str | None]:
        """What ``version`` is to this model now, and why when it does not serve."""
        policy = self.policy
        if version == champion:
            return "champion", None
        if version == policy.canary:
            return "canary", None
        if version == policy.shadow:
            return "shadow", None
        if version in self.unblessed:
            return "unblessed", self.unblessed[version]
        if version in self.failed:
            return "refused", f"failed to load: {self.ledger.failures.get(version, '')}"
        if version in self.refused:
            return "refused", self.refused[version]
        if version in policy.previous:
            return "previous", None
        return "published", None

    def drop(self, version: int) -> None:
        self.loaded.pop(version, None)
        self.pins.pop(version, None)

    def problem(self, name: str, record: Mapping[str, Any]) -> tuple[str, str] | None:
        """Why ``record`` cannot apply now: (PENDING, why) while its version is unknown, (REFUSED, why)
        for good; None when it can."""
        action, version = record["action"], record.get("version")
        if version is None or (action == "canary" and not record.get("weight")):
            return None
        if version in self.failed:
            return REFUSED, f"version {version} failed to load: {self.ledger.failures.get(version, '')}"
        if version in self.refused:
            return (
                REFUSED,
                f"version {version} cannot serve under these definitions: {self.refused[version]}",
            )
        if not self.ledger.knows(version) and version not in self.loaded:
            return PENDING, f"version {version} of model {name!r} has not been published (not read here yet)"
        if action in SERVES_TRAFFIC and version in self.unblessed:
            return REFUSED, f"version {version} is not blessed: {self.unblessed[version]}"
        if version in self.ledger.evicted and version not in self.loaded:
            return REFUSED, f"version {version} is older than the versions this node keeps loadable"
        return None

    def settle(self, name: str, outcome: Outcome) -> bool:
        """Apply, hold or refuse a pending deployment; True when the policy changed."""
        record, action = outcome.record, outcome.record["action"]
        problem = self.problem(name, record)
        if problem is not None:
            status, reason = problem
            if status == REFUSED:
                self.decide(name, outcome, REFUSED, reason)
            elif not outcome.held:
                outcome.held, outcome.reason = True, f"{reason}: held until it is"
                logger.warning("model %s: deployment %s held: %s", name, outcome.id, reason)
            return False
        try:
            policy = self.policy.apply(record, self.serving_version())
        except DeploymentError as exc:
            self.decide(name, outcome, REFUSED, str(exc))
            return False
        outcome.prior, self.policy = self.policy, policy
        self.decide(name, outcome, APPLIED)
        aspect = ASPECT.get(action, action)
        for held in self.ledger.held():
            if held.seq < outcome.seq and ASPECT.get(held.record["action"], held.record["action"]) == aspect:
                self.decide(name, held, REFUSED, f"superseded by deployment {outcome.id} ({action})")
        return True

    def settle_held(self, name: str) -> bool:
        """Settle the deployments held for a version; True when the policy changed."""
        changed = False
        for outcome in self.ledger.held():
            if outcome.status == PENDING:  # an earlier one may have superseded it
                changed |= self.settle(name, outcome)
        return changed

    def decide(self, name: str, outcome: Outcome, status: str, why: str = "") -> None:
        outcome.decide(status, why or None)
        record = outcome.record
        what = (name, outcome.id, record["action"], record.get("version"), record.get("source") or "unknown")
        if status == APPLIED:
            DEPLOYMENTS_APPLIED.labels(name, record["action"]).inc()
            logger.info(
                "model %s: deployment %s (%s version %s, from %s) applied (%s) -> %s",
                *what,
                record.get("reason") or "no reason given",
                self.policy.describe(),
            )
        else:
            DEPLOYMENTS_REFUSED.labels(name, record["action"]).inc()
            logger.error("model %s: deployment %s (%s version %s, from %s) refused: %s", *what, why)

    def unpin(self, name: str, version: int, why: str) -> None:
        """Take ``version``, which cannot serve, out of the policy: the deployment that put it there is
        undone (the champion goes back to what it was before) and its outcome becomes refused."""
        policy = self.policy
        if version not in (policy.champion, policy.canary, policy.shadow):
            return
        applied = [
            o
            for o in self.ledger.outcomes.values()
            if o.status == APPLIED and o.record.get("version") == version
        ]
        for outcome in applied:
            outcome.decide(REFUSED, f"applied, then undone: {why}")
        if policy.champion == version:
            prior = next((o.prior for o in reversed(applied) if o.prior is not None), None)
            policy = replace(
                policy,
                champion=prior.champion if prior is not None else None,
                previous=prior.previous if prior is not None else policy.previous,
            )
        if policy.canary == version:
            policy = replace(policy, canary=None, canary_weight=0.0)
        if policy.shadow == version:
            policy = replace(policy, shadow=None)
        self.policy = policy
        logger.error("model %s: %s; policy now %s", name, why, policy.describe())
