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
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge

from infra.errors import DeploymentError, ServingError
from models.inputs import ModelInputs
from models.runtime import LoadedModel
from serving import ledger as ledgers
from serving.deployments import ARM_CANARY, ARM_CHAMPION, ARM_SHADOW, Routing, TrafficPolicy, validate
from serving.ledger import PENDING, REFUSED, DeploymentRefused
from serving.lineage import LINEAGE_REFUSED, LineageMismatch, lineage_of
from serving.modelstate import ModelState, Pin, Source
from serving.validation import RequestSchema

logger = logging.getLogger(__name__)

MODEL_SWAPS = Counter("tide_model_swaps_total", "Changes of the version answering as champion", ["model"])
ARM_VERSION = Gauge(
    "tide_model_version",
    "Version answering in each arm (0: none)",
    ["model", "arm"],
    multiprocess_mode="mostrecent",
)

MAX_RECORDS = 32  # newest version records kept (besides those the policy names) for later loads


class ModelRegistry:
    """The routing of each model name, built from the versions loaded and the traffic policy."""

    def __init__(self, known: Iterable[str] = (), *, pending_s: float = 60.0) -> None:
        """``pending_s``: how long a deployment naming a version not read yet is held before it is
        refused (``TIDE_SERVE_DEPLOYMENT_PENDING_S``)."""
        self.pending_s = pending_s
        self._routing: dict[str, Routing] = {}
        self._states: dict[str, ModelState] = {name: ModelState() for name in known}
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
                        "unblessed": {str(v): reason for v, reason in sorted(state.unblessed.items())},
                        "pending": [o.describe() for o in state.ledger.pending()],
                        "versions": [state.loaded[v].describe() for v in sorted(state.loaded)],
                    }
                )
            return out

    def versions(self, name: str) -> list[dict[str, Any]] | None:
        """Every version of ``name`` published (lineage, blessing, canary verdicts) with its status here:
        champion, canary, shadow, previous, unblessed, refused or published. None: an unknown model."""
        with self._changed:
            state = self._states.get(name)
            if state is None:
                return None
            routing = self._routing.get(name)
            champion = routing.champion.version if routing is not None else state.serving_version()
            out = []
            for version, summary in sorted(state.ledger.versions.items()):
                status, why = state.status_of(version, champion)
                verdicts = list(state.ledger.verdicts.get(version, ()))
                out.append({**summary, "status": status, "status_reason": why, "verdicts": verdicts})
            return out

    def champion_version(self, name: str) -> int | None:
        """The version that answers (or, with none loaded, that the policy wants to) as champion."""
        with self._changed:
            state, routing = self._states.get(name), self._routing.get(name)
            if routing is not None:
                return routing.champion.version
            return state.serving_version() if state is not None else None

    def deployments(self, name: str) -> list[dict[str, Any]] | None:
        """The deployments of ``name`` read or published here, newest first, with their outcomes."""
        with self._changed:
            state = self._states.get(name)
            return state.ledger.recent() if state is not None else None

    def deployment(self, name: str, deployment_id: str) -> dict[str, Any] | None:
        with self._changed:
            state = self._states.get(name)
            outcome = state.ledger.outcomes.get(deployment_id) if state is not None else None
            return outcome.describe() if outcome is not None else None

    # --- writers -------------------------------------------------------------------------------------------

    def declare(self, name: str) -> None:
        """Mark ``name`` as served, before any version of it has loaded."""
        with self._changed:
            self._removed.discard(name)
            self._states.setdefault(name, ModelState())

    def define(self, name: str, schema: RequestSchema | None, pin: Pin | None) -> list[int]:
        """Serve ``name`` under (new) definitions: its request schema, and ``pin``, which gives the
        inputs each version is scored with (raising :class:`LineageMismatch` for one that cannot be
        served). The loaded versions are pinned again and those refused dropped; the new routing is
        built aside and swapped in whole. Returns the versions refused before, to be reconsidered (the
        follower's :meth:`ModelFollower.reconsider`)."""
        with self._changed:
            self._removed.discard(name)
            state = self._states.setdefault(name, ModelState())
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
            name = record["model"]
            state = self._states.setdefault(name, ModelState())
            version = int(record["version"])
            state.ledger.note_version(record)
            if version in state.failed:
                return
            state.records[version] = (record, source)
            if not ledgers.is_blessed(record):
                state.unblessed[version] = ledgers.unblessed_reason(record)
                logger.warning(
                    "model %s version %d is not blessed (%s): it never serves as champion under follow",
                    name,
                    version,
                    state.unblessed[version],
                )
            elif version not in state.refused:
                self._advance(name, state, version)
            self._trim(state)
            if state.settle_held(name):  # deployments waiting for this version
                self._reroute(name, state)

    def swap(self, model: LoadedModel, inputs: ModelInputs | None = None) -> bool:
        """Add a loaded version (as published and loaded), scored with ``inputs`` (default: the model's
        current inputs); True when the routing changed. Under definitions (:meth:`define`) the version
        is pinned to them here, and refused (False) when its lineage does not fit."""
        with self._changed:
            if model.name in self._removed:
                return False
            state = self._states.setdefault(model.name, ModelState())
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
            if not state.ledger.knows(model.version):  # loaded without its record (tests, tools)
                state.ledger.note_version({**model.describe(), "created_ts": model.published_ts})
                state.settle_held(model.name)  # rerouted below
            if model.version not in state.unblessed:
                self._advance(model.name, state, model.version)
            return self._reroute(model.name, state)

    def failed(self, name: str, version: int, reason: str = "") -> None:
        """A version did not load: never try it again, and stop wanting it. A deployment that made it
        champion, canary or shadow is undone and marked refused (serving.ledger)."""
        with self._changed:
            state = self._states.setdefault(name, ModelState())
            state.failed.add(version)
            state.ledger.failures[version] = reason or "it failed to load"
            state.records.pop(version, None)
            if state.newest == version:
                state.newest = state.usable_newest()
            state.unpin(name, version, f"version {version} failed to load: {reason or 'unknown'}")
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

    def deploy(self, record: Mapping[str, Any], source: Source | None = None) -> dict[str, Any]:
        """Apply one deployment record, or hold it until its version is read, or refuse it; returns its
        outcome (serving.ledger). Raises :class:`DeploymentError` for a record that is not valid."""
        if not record.get("id"):  # older records: named by where they were read
            record = {**record, "id": str(source) if source is not None else uuid.uuid4().hex}
        name = record["model"]
        with self._changed:
            state = self._states.setdefault(name, ModelState())
            outcome = state.ledger.outcome(record)
            if outcome.status == PENDING:
                try:
                    validate(record)
                except DeploymentError as exc:
                    state.decide(name, outcome, REFUSED, f"{exc.field}: {exc}")
                    raise
                if state.settle(name, outcome):
                    self._reroute(name, state)
            return outcome.describe()

    def expect(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Note a deployment published from here, pending until it is read back from the topic."""
        with self._changed:
            state = self._states.setdefault(record["model"], ModelState())
            outcome = state.ledger.outcome(record)
            if outcome.status == PENDING and not outcome.held:
                outcome.reason = "published; not read back from the deployments topic yet"
            return outcome.describe()

    def abandon(self, record: Mapping[str, Any], reason: str) -> None:
        """A deployment noted by :meth:`expect` could not be published."""
        with self._changed:
            state = self._states.setdefault(record["model"], ModelState())
            outcome = state.ledger.outcome(record)
            if outcome.status == PENDING:
                state.decide(record["model"], outcome, REFUSED, f"not published: {reason}")

    def preview(self, record: Mapping[str, Any]) -> TrafficPolicy:
        """The policy ``record`` would lead to here, without applying it. Raises
        :class:`~serving.ledger.DeploymentRefused` (409) for what this node would not apply: a version
        never published, unblessed, failed or refused; a rollback with nothing to roll back to."""
        name, action, version = record["model"], record["action"], record.get("version")
        with self._changed:
            state = self._states.get(name) or ModelState()
            problem = state.problem(name, record)
            if problem is not None:
                status, reason = problem
                if status == PENDING:
                    reason = f"version {version} was never published for model {name!r}"
                raise DeploymentRefused(name, action, version, reason)
            try:
                return state.policy.apply(record, state.serving_version())
            except DeploymentError as exc:
                if exc.status != 409:
                    raise
                raise DeploymentRefused(name, action, version, str(exc)) from exc

    def expire(self, now: float | None = None, *, at_ms: int | None = None) -> None:
        """Refuse deployments pending longer than ``pending_s``: since they were received (``now``, the
        monotonic clock), or with ``at_ms`` (ms since the epoch) since their record's ``ts``, for a
        reader replaying the topics (``tide models``) that decides as a node that read them live would."""
        now = time.monotonic() if now is None else now
        with self._changed:
            for name, state in self._states.items():
                for outcome in state.ledger.pending():
                    if at_ms is not None:
                        since = int(outcome.record.get("ts") or outcome.received_ts)
                        if at_ms - since < self.pending_s * 1000:
                            continue
                    elif now - outcome.received < self.pending_s:
                        continue
                    version = outcome.record.get("version")
                    why = (
                        f"version {version} was not published within {self.pending_s:g} s"
                        if outcome.held
                        else f"not read back from the deployments topic within {self.pending_s:g} s"
                    )
                    state.decide(name, outcome, REFUSED, why)

    def verdict(self, record: Mapping[str, Any]) -> None:
        """Keep a canary verdict with the version it judged (the newest few per version)."""
        with self._changed:
            if record["model"] not in self._removed:
                self._states.setdefault(record["model"], ModelState()).ledger.note_verdict(record)

    def problems(self) -> list[str]:
        """Why a model cannot serve what its policy pins (for /readyz): a champion pinned to a version
        unknown, unblessed, failed or refused."""
        with self._changed:
            out = []
            for name, state in sorted(self._states.items()):
                pinned = state.policy.champion
                if pinned is None or pinned in state.loaded:
                    continue
                problem = state.problem(name, {"action": "promote", "version": pinned})
                if problem is not None:
                    out.append(f"model {name!r}: champion pinned to version {pinned}: {problem[1]}")
            return out

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

    def _refuse(self, name: str, state: ModelState, version: int, reason: str) -> None:
        state.refused[version] = reason
        state.drop(version)
        LINEAGE_REFUSED.labels(name).inc()
        serving = state.serving_version()
        # an older version than the one serving (say, after its view version was retired) is routine
        level = logging.ERROR if serving is None or version >= serving else logging.INFO
        logger.log(level, "%s; refused, not served (what served before keeps serving)", reason)

    def _advance(self, name: str, state: ModelState, version: int) -> None:
        if state.newest is not None and version <= state.newest:
            return
        if state.policy.champion is None and state.newest is not None:
            # Following the newest: the version it replaces is the one a rollback returns to.
            state.policy = state.policy.replacing(state.newest, version)
        state.newest = version

    def _trim(self, state: ModelState) -> None:
        keep = set(state.policy.wanted(state.newest)) | set(state.policy.previous)
        keep.update(sorted(state.records)[-MAX_RECORDS:])
        for version in [v for v in state.records if v not in keep]:
            del state.records[version]
            state.ledger.evicted.add(version)

    def _reroute(self, name: str, state: ModelState) -> bool:
        """Build and swap in the routing the policy and the loaded versions allow. True when it changed."""
        current = self._routing.get(name)
        serving = state.serving_version()
        champion = state.loaded.get(serving) if serving is not None else None
        if champion is None:  # the wanted champion is not loaded (yet, or it failed): keep the current one
            champion = current.champion if current else None
            if champion is not None and state.loaded.get(champion.version) is not champion:
                champion = None  # dropped (refused under new definitions): it may not serve any more
            servable = [v for v in state.loaded if v not in state.unblessed]
            if champion is None and state.policy.champion is None and servable:
                champion = state.loaded[max(servable)]
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
