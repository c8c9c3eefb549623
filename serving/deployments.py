"""Traffic policy: which loaded model version answers which request.

A model's policy is built by replaying its ``deployment`` records (the deployments topic) in order::

    promote   version v becomes the champion (pinned); the champion it replaces is remembered for a
              rollback; a canary of v ends (it has been promoted)
    canary    version v answers ``weight`` of the entities; weight 0 ends the canary
    shadow    version v also scores every request; its answer is logged, never returned; no version ends it
    rollback  the champion goes back to the one before it (or to ``version`` when given); the canary ends
    follow    the champion is the newest version published (the default before any promote)

Canary assignment is sticky per entity: the requests for the same entity values (all the join keys the
model is read for) go to the same arm, on every worker and every node, because the arm is a pure
function of (model, entity values, weight) — a stable hash, never Python's per-process salted
``hash``. Raising the weight only moves entities from champion to canary.

:class:`TrafficPolicy` is plain data (what the records asked for); :class:`Routing` is what a request
sees: the loaded champion, canary and shadow. The registry rebuilds a ``Routing`` whenever the policy or
the set of loaded versions changes and swaps it in whole, so one request never mixes two policies.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import Producer

from infra.errors import DeploymentError, StreamError
from infra.kafka import make_producer
from infra.settings import CommonSettings
from infra.topics import topic
from models.inputs import ModelInputs
from models.runtime import LoadedModel
from schemas import codec
from serving.validation import RequestSchema

logger = logging.getLogger(__name__)

# action -> (its version: "required", "optional" or "absent"; whether it takes a weight). One table for
# validation and for the OpenAPI document.
ACTION_RULES: dict[str, tuple[str, bool]] = {
    "promote": ("required", False),
    "canary": ("required", True),
    "shadow": ("optional", False),
    "rollback": ("optional", False),
    "follow": ("absent", False),
}
ACTIONS = tuple(ACTION_RULES)
ARM_CHAMPION, ARM_CANARY, ARM_SHADOW = "champion", "canary", "shadow"
MAX_PREVIOUS = 16  # champions remembered for rollbacks
MAX_VERSION = 2**31 - 1  # versions are Avro ints


def deployment_record(
    model: str,
    action: str,
    version: int | None = None,
    weight: float = 0.0,
    reason: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """A validated ``deployment`` record with a new id, ready to publish; ``source`` says who publishes
    it (api, cli, judge, retrain). Raises :class:`DeploymentError`."""
    # JSON has one number type: 3.0 is the integer 3 (as JSON Schema's "integer" says), 1 the weight 1.0.
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    if isinstance(weight, int) and not isinstance(weight, bool):
        weight = float(weight)
    record = {
        "model": model,
        "action": action,
        "version": version,
        "weight": weight,
        "reason": reason,
        "id": uuid.uuid4().hex,
        "source": source,
        "ts": int(time.time() * 1000),
    }
    validate(record)
    return record


def validate(record: Mapping[str, Any]) -> None:
    """Check a deployment's fields against its action; errors name the field."""
    action, version, weight = record.get("action"), record.get("version"), record.get("weight", 0.0)
    if action not in ACTIONS:
        raise DeploymentError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}", field="action")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION
    ):
        raise DeploymentError(
            f"must be an integer in [1, {MAX_VERSION}] or null, got {version!r}", field="version"
        )
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or not 0.0 <= weight <= 1.0
    ):
        raise DeploymentError(f"must be a number in [0, 1], got {weight!r}", field="weight")
    reason = record.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise DeploymentError(f"must be a string or null, got {type(reason).__name__}", field="reason")
    needs_version, takes_weight = ACTION_RULES[action]
    if needs_version == "required" and version is None:
        raise DeploymentError(f"{action} needs a version", field="version")
    if needs_version == "absent" and version is not None:
        raise DeploymentError(f"{action} takes no version", field="version")
    if not takes_weight and weight:
        raise DeploymentError(f"{action} takes no weight", field="weight")


@dataclass(frozen=True)
class TrafficPolicy:
    """What the deployment records asked for. ``champion`` None means: the newest version."""

    champion: int | None = None
    canary: int | None = None
    canary_weight: float = 0.0
    shadow: int | None = None
    previous: tuple[int, ...] = ()  # champions replaced, oldest first

    def apply(self, record: Mapping[str, Any], serving: int | None) -> TrafficPolicy:
        """The policy after ``record``; ``serving`` is the champion version answering now (if any)."""
        validate(record)
        action, version = record["action"], record.get("version")
        if action == "promote":
            return replace(
                self.replacing(serving, version),
                champion=version,
                canary=None if self.canary == version else self.canary,
                canary_weight=0.0 if self.canary == version else self.canary_weight,
            )
        if action == "canary":
            weight = float(record.get("weight") or 0.0)
            if weight == 0.0:
                return replace(self, canary=None, canary_weight=0.0)
            return replace(self, canary=version, canary_weight=weight)
        if action == "shadow":
            return replace(self, shadow=version)
        if action == "rollback":
            if version is not None:
                return replace(
                    self.replacing(serving, version), champion=version, canary=None, canary_weight=0
                )
            previous = [v for v in self.previous if v != serving]
            if not previous:
                raise DeploymentError(
                    "nothing to roll back to: no earlier champion", field="version", status=409
                )
            return replace(
                self, champion=previous[-1], previous=tuple(previous[:-1]), canary=None, canary_weight=0.0
            )
        return replace(self, champion=None)  # follow

    def replacing(self, serving: int | None, incoming: int | None) -> TrafficPolicy:
        """This policy with ``serving`` remembered as a previous champion, when ``incoming`` replaces it."""
        if serving is None or serving == incoming:
            return self
        return replace(self, previous=(*[v for v in self.previous if v != serving], serving)[-MAX_PREVIOUS:])

    def wanted(self, newest: int | None) -> list[int]:
        """Versions to keep loaded, most important first: champion, canary, shadow, last champion."""
        want = [self.champion if self.champion is not None else newest, self.canary, self.shadow]
        want.extend(self.previous[-1:])
        return list(dict.fromkeys(v for v in want if v is not None))

    def describe(self) -> dict[str, Any]:
        return {
            "champion": self.champion if self.champion is not None else "newest",
            "canary": self.canary,
            "canary_weight": self.canary_weight,
            "shadow": self.shadow,
            "previous_champions": list(self.previous),
        }


def bucket(model: str, entity: str) -> float:
    """A stable position of ``entity`` (a request's entity values, as one string:
    :meth:`models.inputs.ModelInputs.entity_key`) in [0, 1) for ``model``, the same in every process."""
    digest = hashlib.blake2b(f"{model}\x00{entity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class Routing:
    """Everything one request of a model is served with: the loaded versions it is routed between,
    the inputs each version is scored with (its lineage: ``inputs`` by version) and the request schema
    of the model's definition. Immutable: replaced whole on any change, definitions included, so one
    request never mixes two definitions or two policies.

    ``inputs`` and ``schema`` may be left out (a registry used without definitions): the model's
    current inputs and schema then apply.
    """

    champion: LoadedModel
    canary: LoadedModel | None = None
    canary_weight: float = 0.0
    shadow: LoadedModel | None = None
    inputs: Mapping[int, ModelInputs] = field(default_factory=dict)
    schema: RequestSchema | None = None

    def inputs_of(self, model: LoadedModel, default: ModelInputs) -> ModelInputs:
        """The inputs ``model`` (one of the arms) is scored with."""
        return self.inputs.get(model.version, default)

    def pick(self, entity: str) -> tuple[LoadedModel, str]:
        """The model and arm that answer for ``entity`` (the request's entity values, as one string)."""
        if self.canary is not None and bucket(self.champion.name, entity) < self.canary_weight:
            return self.canary, ARM_CANARY
        return self.champion, ARM_CHAMPION

    def describe(self) -> dict[str, Any]:
        split = {str(self.champion.version): 1.0 - (self.canary_weight if self.canary else 0.0)}
        if self.canary is not None:
            split[str(self.canary.version)] = self.canary_weight
        return {
            "champion": self.champion.version,
            "canary": self.canary.version if self.canary else None,
            "shadow": self.shadow.version if self.shadow else None,
            "traffic": split,
        }


def publish_deployment(
    settings: CommonSettings,
    record: Mapping[str, Any],
    producer: Producer | None = None,
    timeout_s: float = 10.0,
) -> None:
    """Publish a validated deployment record to the deployments topic and wait for the broker's ack.

    Every serving node applies it when it reads it back, so all nodes route alike. Raises
    :class:`StreamError` when the broker did not take it within ``timeout_s``.
    """
    validate(record)
    own = producer is None
    producer = producer or make_producer(settings)
    errors: list[Any] = []
    producer.produce(
        topic(settings, "deployments"),
        key=str(record["model"]).encode(),
        value=codec.encode("deployment", record),
        on_delivery=lambda err, _msg: errors.append(err),
    )
    left = producer.flush(timeout_s)
    if left or not errors or errors[0] is not None:
        reason = errors[0] if errors and errors[0] is not None else f"no acknowledgement in {timeout_s} s"
        if own:
            producer.purge()
        raise StreamError(f"deployment for model {record['model']!r} not published: {reason}")
    logger.info("published deployment %s", dict(record))
