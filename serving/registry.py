"""Which model versions serve each model name.

Swap atomicity: :class:`ModelRegistry` keeps one immutable :class:`~serving.deployments.Routing` per
name (champion, canary, shadow — each an immutable :class:`LoadedModel` — the inputs each is scored with,
and the model's request schema) in a plain dict. Any change (a new version loaded, a deployment applied,
new definitions) builds a new ``Routing`` and replaces the dict value in one assignment (atomic under the
GIL). A request reads the routing once and uses it to the end, so a swap never changes the model under an
in-flight request, and no request sees a half-loaded model (loading and warm-up finish before the
assignment). Readers take no lock; writers serialise on one.

Definitions change while the node runs (:meth:`ModelRegistry.define`, :meth:`ModelRegistry.remove`): a
model's loaded versions are pinned again to their lineage (:mod:`serving.lineage`) and the routing rebuilt
aside and swapped in whole. A version whose lineage does not fit the definitions is refused (logged,
counted, never served) and reconsidered when they change again; a removed model's versions are dropped.
The thread that feeds the registry from the models and deployments topics is
:class:`serving.follower.ModelFollower`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from infra.errors import ServingError
from models.inputs import ModelInputs
from models.runtime import LoadedModel
from serving.deployments import ARM_CANARY, ARM_CHAMPION, ARM_SHADOW, Routing, TrafficPolicy
from serving.lineage import LINEAGE_REFUSED, LineageMismatch, lineage_of
from serving.validation import RequestSchema

logger = logging.getLogger(__name__)

MODEL_SWAPS = Counter("tide_model_swaps_total", "Changes of the version answering as champion", ["model"])
DEPLOYMENTS_APPLIED = Counter(
    "tide_deployments_applied_total", "Deployment actions applied", ["model", "action"]
)
ARM_VERSION = Gauge(
    "tide_model_version",
    "Version answering in each arm (0: none)",
    ["model", "arm"],
    multiprocess_mode="mostrecent",
)

MAX_RECORDS = 32  # newest version records kept (besides those the policy names) for later loads

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
class _ModelState:
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

    def serving_version(self) -> int | None:
        return self.policy.champion if self.policy.champion is not None else self.newest

    def usable_newest(self) -> int | None:
        usable = [v for v in self.records if v not in self.failed and v not in self.refused]
        return max([*usable, *self.loaded], default=None)

    def drop(self, version: int) -> None:
        self.loaded.pop(version, None)
        self.pins.pop(version, None)


class ModelRegistry:
    """The routing of each model name, built from the versions loaded and the traffic policy."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._routing: dict[str, Routing] = {}
        self._states: dict[str, _ModelState] = {name: _ModelState() for name in known}
        self._removed: set[str] = set()  # models taken out of the definitions: their versions are ignored
        self._changed = threading.Condition()

    # --- readers (no lock) ---------------------------------------------------------------------------------

    def routing(self, name: str) -> Routing | None:
        """The routing of ``name`` now; read it once per request and keep using that object."""
        return self._routing.get(name)

    def get(self, name: str) -> LoadedModel | None:
        """The champion of ``name`` now."""
        routing = self._routing.get(name)
        return routing.champion if routing is not None else None

    def is_known(self, name: str) -> bool:
        """Whether ``name`` is a model this service serves (loaded or not yet)."""
        return name in self._states

    def published(self, name: str) -> bool:
        """Whether a loadable version of ``name`` has been published (loaded or still to load)."""
        with self._changed:
            state = self._states.get(name)
            return state is not None and (state.newest is not None or bool(state.loaded))

    def describe(self) -> list[dict[str, Any]]:
        """Every model: its routing (aliases, traffic split), policy and loaded versions."""
        with self._changed:
            out = []
            for name in sorted(self._states):
                state, routing = self._states[name], self._routing.get(name)
                out.append(
                    {
                        "name": name,
                        **(routing.describe() if routing else {"champion": None, "traffic": {}}),
                        "policy": state.policy.describe(),
                        "newest": state.newest,
                        "failed": sorted(state.failed),
                        "refused": {str(v): reason for v, reason in sorted(state.refused.items())},
                        "versions": [state.loaded[v].describe() for v in sorted(state.loaded)],
                    }
                )
            return out

    # --- writers -------------------------------------------------------------------------------------------

    def declare(self, name: str) -> None:
        """Mark ``name`` as served, before any version of it has loaded."""
        with self._changed:
            self._removed.discard(name)
            self._states.setdefault(name, _ModelState())

    def define(self, name: str, schema: RequestSchema | None, pin: Pin | None) -> list[int]:
        """Serve ``name`` under (new) definitions: its request schema, and ``pin``, which gives the
        inputs each version is scored with (raising :class:`LineageMismatch` for one that cannot be
        served). The loaded versions are pinned again and those refused dropped; the new routing is
        built aside and swapped in whole. Returns the versions refused before, to be reconsidered (the
        follower's :meth:`ModelFollower.reconsider`)."""
        with self._changed:
            self._removed.discard(name)
            state = self._states.setdefault(name, _ModelState())
            state.schema, state.pin = schema, pin
            retry = sorted(state.refused)
            state.refused.clear()
            if pin is not None:
                for version, model in sorted(state.loaded.items()):
                    try:
                        state.pins[version] = pin(lineage_of(model))
                    except LineageMismatch as exc:
                        self._refuse(name, state, version, str(exc))
            state.newest = state.usable_newest()
            self._reroute(name, state)
            return retry

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (taken out of the definitions): its routing and versions are dropped,
        and versions of it read later are ignored until it is declared again."""
        with self._changed:
            self._removed.add(name)
            state = self._states.pop(name, None)
            routing = self._routing.pop(name, None)
            self._changed.notify_all()
        if routing is not None:
            for arm in (ARM_CHAMPION, ARM_CANARY, ARM_SHADOW):
                ARM_VERSION.labels(name, arm).set(0)
        if state is not None:
            logger.info(
                "model %s: removed from the definitions; versions %s dropped", name, sorted(state.loaded)
            )

    def remember(self, record: Mapping[str, Any], source: Source | None = None) -> None:
        """Note a published model version (loading is the follower's job: see :meth:`wanted`)."""
        with self._changed:
            if record["model"] in self._removed:
                return
            state = self._states.setdefault(record["model"], _ModelState())
            version = int(record["version"])
            if version in state.failed:
                return
            state.records[version] = (record, source)
            if version in state.refused:
                return
            self._advance(record["model"], state, version)
            self._trim(state)

    def swap(self, model: LoadedModel, inputs: ModelInputs | None = None) -> bool:
        """Add a loaded version (as published and loaded), scored with ``inputs`` (default: the model's
        current inputs); True when the routing changed. Under definitions (:meth:`define`) the version
        is pinned to them here, and refused (False) when its lineage does not fit."""
        with self._changed:
            if model.name in self._removed:
                return False
            state = self._states.setdefault(model.name, _ModelState())
            if state.pin is not None:
                try:  # pinned again: the definitions may have changed while it loaded
                    inputs = state.pin(lineage_of(model))
                except LineageMismatch as exc:
                    self._refuse(model.name, state, model.version, str(exc))
                    state.newest = state.usable_newest()
                    self._reroute(model.name, state)
                    return False
            state.loaded[model.version] = model
            if inputs is not None:
                state.pins[model.version] = inputs
            self._advance(model.name, state, model.version)
            return self._reroute(model.name, state)

    def failed(self, name: str, version: int) -> None:
        """A version did not load: never try it again, and stop wanting it."""
        with self._changed:
            state = self._states.setdefault(name, _ModelState())
            state.failed.add(version)
            state.records.pop(version, None)
            if state.newest == version:
                state.newest = state.usable_newest()
            self._reroute(name, state)

    def refuse(self, name: str, version: int, reason: str) -> None:
        """A version's lineage does not fit the definitions served: never serve it under them (logged
        and counted); what served before keeps serving."""
        with self._changed:
            state = self._states.get(name)
            if state is None:
                return
            self._refuse(name, state, version, reason)
            state.newest = state.usable_newest()
            self._reroute(name, state)

    def deploy(self, record: Mapping[str, Any]) -> None:
        """Apply one deployment record. Raises :class:`DeploymentError` when it cannot apply."""
        name = record["model"]
        with self._changed:
            state = self._states.setdefault(name, _ModelState())
            state.policy = state.policy.apply(record, state.serving_version())
            self._reroute(name, state)
        DEPLOYMENTS_APPLIED.labels(name, record["action"]).inc()
        logger.info(
            "model %s: %s version %s weight %s (%s) -> %s",
            name,
            record["action"],
            record.get("version"),
            record.get("weight"),
            record.get("reason") or "no reason given",
            state.policy.describe(),
        )

    def preview(self, record: Mapping[str, Any]) -> TrafficPolicy:
        """The policy ``record`` would lead to here, without applying it (DeploymentError if it cannot)."""
        with self._changed:
            state = self._states.get(record["model"]) or _ModelState()
            return state.policy.apply(record, state.serving_version())

    def wanted(self, name: str) -> list[Mapping[str, Any]]:
        """Records of the versions the policy wants that are not loaded yet, most important first."""
        with self._changed:
            state = self._states.get(name)
            if state is None:
                return []
            return [
                state.records[v][0]
                for v in state.policy.wanted(state.newest)
                if v not in state.loaded and v in state.records and v not in state.refused
            ]

    def source(self, name: str, version: int) -> Source | None:
        with self._changed:
            state = self._states.get(name)
            entry = state.records.get(version) if state else None
            return entry[1] if entry else None

    def wait_for(self, name: str, version: int | None = None, timeout: float = 10.0) -> LoadedModel:
        """Block until the champion of ``name`` is ``version`` or newer (any when None)."""
        return self.wait_until(
            name,
            lambda r: version is None or r.champion.version >= version,
            timeout,
            f"champion version {version}",
        ).champion

    def wait_until(
        self, name: str, check: Callable[[Routing], bool], timeout: float = 10.0, what: str = "a routing"
    ) -> Routing:
        """Block until ``name``'s routing passes ``check``; ServingError on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                routing = self._routing.get(name)
                if routing is not None and check(routing):
                    return routing
                left = deadline - time.monotonic()
                if left <= 0:
                    have = routing.describe() if routing else None
                    raise ServingError(f"model {name!r}: {what} not reached in {timeout} s (have {have})")
                self._changed.wait(left)

    # --- internals (lock held) -----------------------------------------------------------------------------

    def _refuse(self, name: str, state: _ModelState, version: int, reason: str) -> None:
        state.refused[version] = reason
        state.drop(version)
        LINEAGE_REFUSED.labels(name).inc()
        serving = state.serving_version()
        # an older version than the one serving (say, after its view version was retired) is routine
        level = logging.ERROR if serving is None or version >= serving else logging.INFO
        logger.log(level, "%s; refused, not served (what served before keeps serving)", reason)

    def _advance(self, name: str, state: _ModelState, version: int) -> None:
        if state.newest is not None and version <= state.newest:
            return
        if state.policy.champion is None and state.newest is not None:
            # Following the newest: the version it replaces is the one a rollback returns to.
            state.policy = state.policy.replacing(state.newest, version)
        state.newest = version

    def _trim(self, state: _ModelState) -> None:
        keep = set(state.policy.wanted(state.newest)) | set(state.policy.previous)
        keep.update(sorted(state.records)[-MAX_RECORDS:])
        for version in [v for v in state.records if v not in keep]:
            del state.records[version]

    def _reroute(self, name: str, state: _ModelState) -> bool:
        """Build and swap in the routing the policy and the loaded versions allow. True when it changed."""
        current = self._routing.get(name)
        serving = state.serving_version()
        champion = state.loaded.get(serving) if serving is not None else None
        if champion is None:  # the wanted champion is not loaded (yet, or it failed): keep the current one
            champion = current.champion if current else None
            if champion is not None and state.loaded.get(champion.version) is not champion:
                champion = None  # dropped (refused under new definitions): it may not serve any more
            if champion is None and state.policy.champion is None and state.loaded:
                champion = state.loaded[max(state.loaded)]
        if champion is None:
            if current is None:
                return False
            del self._routing[name]  # nothing of this model may serve now
            self._changed.notify_all()
            for arm in (ARM_CHAMPION, ARM_CANARY, ARM_SHADOW):
                ARM_VERSION.labels(name, arm).set(0)
            logger.warning("model %s: no version can serve under the definitions served", name)
            return True
        canary = state.loaded.get(state.policy.canary) if state.policy.canary else None
        shadow = state.loaded.get(state.policy.shadow) if state.policy.shadow else None
        arms = [m for m in (champion, canary, shadow) if m is not None and m.version in state.pins]
        pins = {m.version: state.pins[m.version] for m in arms}
        routing = Routing(
            champion, canary, state.policy.canary_weight if canary else 0.0, shadow, pins, state.schema
        )
        if routing == current:
            return False
        self._routing[name] = routing  # the one atomic step readers can observe
        # Versions no arm needs any more are dropped (the last champion stays loaded for rollbacks).
        keep = set(state.policy.wanted(state.newest)) | {champion.version}
        for version in [v for v in state.loaded if v not in keep]:
            state.drop(version)
        self._changed.notify_all()
        for arm, model in ((ARM_CHAMPION, champion), (ARM_CANARY, canary), (ARM_SHADOW, shadow)):
            ARM_VERSION.labels(name, arm).set(model.version if model else 0)
        if current is None or current.champion is not champion:
            MODEL_SWAPS.labels(name).inc()
            logger.info(
                "model %s: champion is now version %d (was %s)",
                name,
                champion.version,
                current.champion.version if current else "none",
            )
        return True
