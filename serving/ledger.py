"""What a serving node knows of one model besides its routing: every version published (its lineage,
blessing and canary verdicts) and every deployment read, with its outcome.

A deployment's outcome on this node is one of::

    pending   accepted, not decided yet: published over HTTP and not read back from the topic yet, or
              naming a version this node has not read (held until it arrives, refused after a bound)
    applied   the traffic policy changed as it asked
    refused   not applied, with the reason: a version never published (within the bound), unblessed (for
              what would serve traffic), failed to load or refused by its lineage; nothing to roll back
              to; superseded by a later deployment while it was held

Everything is bounded: :data:`MAX_VERSIONS` version summaries and :data:`MAX_OUTCOMES` deployments per
model, :data:`MAX_VERDICTS` canary verdicts per version. The ledger is plain data, guarded by the
registry's lock (:class:`serving.registry.ModelRegistry`).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.errors import DeploymentError

PENDING, APPLIED, REFUSED = "pending", "applied", "refused"
MAX_VERSIONS = 1000  # version summaries kept per model (the newest)
MAX_OUTCOMES = 200  # deployments remembered per model (the newest; pending ones are never dropped)
MAX_VERDICTS = 20  # canary verdicts kept per version (the newest)
# The fields of a model version listed by GET /v1/models/{name}/versions (its lineage), in that order.
SUMMARY_FIELDS = (
    "version",
    "created_ts",
    "flavor",
    "task",
    "trained_on",
    "metric_name",
    "metric_value",
    "definitions_digest",
    "view_versions",
    "parent_version",
    "trigger",
    "data",
    "blessing",
)
# Which part of the traffic policy an action changes: a later deployment of the same part supersedes one
# still held for its version.
ASPECT = {"promote": "champion", "rollback": "champion", "follow": "champion", "canary": "canary"}
# Actions that make their version answer live traffic: an unblessed version is refused for them.
SERVES_TRAFFIC = frozenset({"promote", "canary", "rollback"})
_SEQ = itertools.count()  # the order deployments were first noted in


class DeploymentRefused(DeploymentError):
    """A deployment this node will not apply (HTTP 409): names the model, the version and why."""

    def __init__(self, model: str, action: str, version: int | None, reason: str) -> None:
        super().__init__(
            f"model {model!r}: {action} of version {version if version is not None else '-'} "
            f"refused: {reason}",
            field="version",
            status=409,
        )
        self.model, self.action, self.version, self.reason = model, action, version, reason

    def body(self) -> dict[str, Any]:
        return {
            "error": str(self),
            "field": self.field,
            "model": self.model,
            "action": self.action,
            "version": self.version,
            "reason": self.reason,
        }


def is_blessed(record: Mapping[str, Any]) -> bool:
    """Whether a version may serve as champion: its blessing says so, or it has none (older records)."""
    blessing = record.get("blessing")
    return blessing is None or bool(blessing.get("blessed", True))


def unblessed_reason(record: Mapping[str, Any]) -> str:
    blessing = record.get("blessing") or {}
    return str(blessing.get("reason") or "not blessed")


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The lineage of a ``model_version`` record, without its artifact or reference profile."""
    return {name: record.get(name) for name in SUMMARY_FIELDS}


@dataclass
class Outcome:
    """One deployment and what became of it on this node."""

    record: Mapping[str, Any]
    status: str = PENDING
    reason: str | None = None
    received_ts: int = field(default_factory=lambda: int(time.time() * 1000))
    received: float = field(default_factory=time.monotonic)  # for the pending bound
    decided_ts: int | None = None
    held: bool = False  # waiting for its version to be published (else: for the topic to be read back)
    prior: Any = None  # the traffic policy before it applied (to undo it when its version cannot serve)
    seq: int = field(default_factory=lambda: next(_SEQ))

    @property
    def id(self) -> str:
        return str(self.record["id"])

    def decide(self, status: str, reason: str | None = None) -> None:
        self.status, self.reason, self.held = status, reason, False
        self.decided_ts = int(time.time() * 1000)

    def describe(self) -> dict[str, Any]:
        record = self.record
        return {
            "id": self.id,
            "model": record["model"],
            "action": record["action"],
            "version": record.get("version"),
            "weight": record.get("weight", 0.0),
            "reason": record.get("reason"),
            "source": record.get("source"),
            "ts": record.get("ts"),
            "status": self.status,
            "status_reason": self.reason,
            "received_ts": self.received_ts,
            "decided_ts": self.decided_ts,
        }


@dataclass
class Ledger:
    """One model's versions, verdicts and deployment outcomes (see the module docstring)."""

    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    verdicts: dict[int, deque[dict[str, Any]]] = field(default_factory=dict)
    outcomes: OrderedDict[str, Outcome] = field(default_factory=OrderedDict)
    evicted: set[int] = field(default_factory=set)  # versions whose record is no longer kept (not loadable)
    failures: dict[int, str] = field(default_factory=dict)  # versions that failed to load: why

    def note_version(self, record: Mapping[str, Any]) -> None:
        version = int(record["version"])
        self.versions[version] = summary(record)
        self.evicted.discard(version)
        if len(self.versions) > MAX_VERSIONS:
            for old in sorted(self.versions)[: len(self.versions) - MAX_VERSIONS]:
                del self.versions[old]

    def knows(self, version: int) -> bool:
        return version in self.versions

    def note_verdict(self, record: Mapping[str, Any]) -> None:
        version = int(record["version"])
        kept = self.verdicts.setdefault(version, deque(maxlen=MAX_VERDICTS))
        kept.append(dict(record))
        if len(self.verdicts) > MAX_VERSIONS:
            del self.verdicts[min(self.verdicts)]

    def outcome(self, record: Mapping[str, Any]) -> Outcome:
        """The outcome of ``record`` (by its id), new or the one noted when it was published."""
        known = self.outcomes.get(str(record["id"]))
        if known is not None:
            known.record = record
            return known
        outcome = self.outcomes[str(record["id"])] = Outcome(record)
        self._trim()
        return outcome

    def pending(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status == PENDING]

    def held(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status == PENDING and o.held]

    def recent(self) -> list[dict[str, Any]]:
        """Every deployment remembered, newest first."""
        return [o.describe() for o in reversed(self.outcomes.values())]

    def _trim(self) -> None:
        excess = len(self.outcomes) - MAX_OUTCOMES
        for key in [k for k, o in self.outcomes.items() if o.status != PENDING][: max(excess, 0)]:
            del self.outcomes[key]
