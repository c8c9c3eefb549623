"""Which model versions serve each model name, and the thread that keeps them current.

Swap atomicity: :class:`ModelRegistry` keeps one immutable :class:`~serving.deployments.Routing` per
name (champion, canary, shadow — each an immutable :class:`LoadedModel`) in a plain dict. Any change
(a new version loaded, a deployment applied) builds a new ``Routing`` and replaces the dict value in one
assignment (atomic under the GIL). A request reads the routing once and uses it to the end, so a swap
never changes the model under an in-flight request, and no request sees a half-loaded model (loading
and warm-up finish before the assignment). Readers take no lock; writers serialise on one.

:class:`ModelFollower` replays the models and deployments topics from the beginning on a daemon
thread: model versions are remembered, deployments update the traffic policy, and the versions the
policy wants are loaded (newest first) and swapped in. A version that fails to load is logged, counted
and published to the dead-letter topic, and the routing that was serving keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Producer
from prometheus_client import Counter, Gauge, Histogram

from infra.deadletter import DeadLetterSink, KafkaDeadLetters
from infra.errors import DeploymentError, SchemaError, ServingError
from infra.kafka import make_producer, messages, replay_reader
from infra.letters import DeadLetter
from infra.topics import TOPICS, topic
from models.runtime import LoadedModel, Loader
from schemas import codec
from serving.deployments import ARM_CANARY, ARM_CHAMPION, ARM_SHADOW, Routing, TrafficPolicy
from serving.settings import ServeSettings

logger = logging.getLogger(__name__)

MODEL_SWAPS = Counter("tide_model_swaps_total", "Changes of the version answering as champion", ["model"])
MODEL_LOAD_FAILURES = Counter(
    "tide_model_load_failures_total", "Model versions that failed to load or warm up", ["model"]
)
MODEL_RECORDS_INVALID = Counter(
    "tide_model_records_invalid_total", "Records on the models or deployments topic that were refused"
)
DEPLOYMENTS_APPLIED = Counter(
    "tide_deployments_applied_total", "Deployment actions applied", ["model", "action"]
)
ARM_VERSION = Gauge(
    "tide_model_version",
    "Version answering in each arm (0: none)",
    ["model", "arm"],
    multiprocess_mode="mostrecent",
)
MODEL_SWAP_DELAY = Histogram(
    "tide_model_swap_delay_seconds",
    "Time from a model version's creation to its swap into serving",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)

MAX_RECORDS = 32  # newest version records kept (besides those the policy names) for later loads


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
    newest: int | None = None  # newest version published that has not failed to load

    def serving_version(self) -> int | None:
        return self.policy.champion if self.policy.champion is not None else self.newest


class ModelRegistry:
    """The routing of each model name, built from the versions loaded and the traffic policy."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._routing: dict[str, Routing] = {}
        self._states: dict[str, _ModelState] = {name: _ModelState() for name in known}
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
                        "versions": [state.loaded[v].describe() for v in sorted(state.loaded)],
                    }
                )
            return out

    # --- writers -------------------------------------------------------------------------------------------

    def declare(self, name: str) -> None:
        """Mark ``name`` as served, before any version of it has loaded."""
        with self._changed:
            self._states.setdefault(name, _ModelState())

    def remember(self, record: Mapping[str, Any], source: Source | None = None) -> None:
        """Note a published model version (loading is the follower's job: see :meth:`wanted`)."""
        with self._changed:
            state = self._states.setdefault(record["model"], _ModelState())
            version = int(record["version"])
            if version in state.failed:
                return
            state.records[version] = (record, source)
            self._advance(record["model"], state, version)
            self._trim(state)

    def swap(self, model: LoadedModel) -> bool:
        """Add a loaded version (as published and loaded); True when the routing changed."""
        with self._changed:
            state = self._states.setdefault(model.name, _ModelState())
            state.loaded[model.version] = model
            self._advance(model.name, state, model.version)
            return self._reroute(model.name, state)

    def failed(self, name: str, version: int) -> None:
        """A version did not load: never try it again, and stop wanting it."""
        with self._changed:
            state = self._states.setdefault(name, _ModelState())
            state.failed.add(version)
            state.records.pop(version, None)
            if state.newest == version:
                usable = [v for v in state.records if v not in state.failed] + list(state.loaded)
                state.newest = max(usable, default=None)
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
                if v not in state.loaded and v in state.records
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
            if champion is None and state.policy.champion is None and state.loaded:
                champion = state.loaded[max(state.loaded)]
        if champion is None:
            return False
        canary = state.loaded.get(state.policy.canary) if state.policy.canary else None
        shadow = state.loaded.get(state.policy.shadow) if state.policy.shadow else None
        routing = Routing(champion, canary, state.policy.canary_weight if canary else 0.0, shadow)
        if routing == current:
            return False
        self._routing[name] = routing  # the one atomic step readers can observe
        # Versions no arm needs any more are dropped (the last champion stays loaded for rollbacks).
        keep = set(state.policy.wanted(state.newest)) | {champion.version}
        for version in [v for v in state.loaded if v not in keep]:
            del state.loaded[version]
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


ConsumerFactory = Callable[[ServeSettings], Consumer]


def _state_reader(settings: ServeSettings) -> Consumer:
    names = ("models", "deployments")
    return replay_reader(settings, {topic(settings, n): TOPICS[n].partitions for n in names})


class ModelFollower:
    """Follows the models and deployments topics on a daemon thread and keeps a registry current."""

    RETRY_S = 1.0

    def __init__(
        self,
        settings: ServeSettings,
        registry: ModelRegistry,
        *,
        loader: Loader,
        models: Collection[str] | None = None,
        consumer_factory: ConsumerFactory = _state_reader,
        dead_letters: DeadLetterSink | None = None,
    ) -> None:
        """``loader``: builds a version from its record (``models.runtime.make_loader``: the project's
        models, and the signature policy). ``models``: the model names followed; records of others on
        the topics are skipped (None: every model)."""
        self.settings = settings
        self.registry = registry
        self._consumer_factory = consumer_factory
        self._loader = loader
        self._models = frozenset(models) if models is not None else None
        self._skipped: set[str] = set()
        self._dead_letters = dead_letters
        self._dl_producer: Producer | None = None  # only when the follower built its own sink
        self._models_topic = topic(settings, "models")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="tide-model-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("model follower did not stop within %.1f s", timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                consumer = self._consumer_factory(self.settings)
            except Exception:
                logger.exception("cannot create a reader for the models topic; retrying")
                self._stop.wait(self.RETRY_S)
                continue
            try:
                for batch in messages(consumer):
                    if self._stop.is_set():
                        break
                    self.apply(
                        (m.value() or b"", Source(m.topic() or "", m.partition() or 0, m.offset() or 0))
                        for m in batch
                    )
            except Exception:
                # Replaying from the start is safe: every record is idempotent on the registry.
                logger.exception("model follower failed; restarting from the beginning")
                self._stop.wait(self.RETRY_S)
            finally:
                consumer.close()

    def apply(self, payloads: Iterable[tuple[bytes, Source]]) -> None:
        """Handle a batch of ``(payload, source)`` records from the models and deployments topics.

        Records are applied in order; then, per model touched, the versions the policy wants are loaded,
        most important first. A replay of a long history so loads the few versions in use, not all.
        """
        touched: set[str] = set()
        for payload, source in payloads:
            touched.update(self._apply_one(payload, source))
        for name in sorted(touched):
            self._converge(name)

    def _apply_one(self, payload: bytes, source: Source) -> list[str]:
        try:
            record = codec.decode(payload)
        except SchemaError as exc:
            MODEL_RECORDS_INVALID.inc()
            logger.warning("skipping undecodable record at %s: %s", source, exc)
            return []
        kind = codec.record_name(payload)
        name = str(record.get("model"))
        if self._models is not None and kind in ("model_version", "deployment") and name not in self._models:
            if name not in self._skipped:
                self._skipped.add(name)
                logger.warning(
                    "skipping records of model %s at %s: not a model of the definitions", name, source
                )
            return []
        if kind == "model_version":
            source.payload = payload
            self.registry.remember(record, source)
        elif kind == "deployment":
            try:
                self.registry.deploy(record)
            except DeploymentError as exc:
                MODEL_RECORDS_INVALID.inc()
                logger.error("refusing deployment at %s (%s): %s", source, record, exc)
                return []
        else:
            MODEL_RECORDS_INVALID.inc()
            logger.warning("skipping a %s record at %s: not a model version or deployment", kind, source)
            return []
        return [record["model"]]

    def _converge(self, name: str) -> None:
        # Each load changes what is wanted (a failure falls back to an older version): ask again.
        while wanted := self.registry.wanted(name):
            record = wanted[0]
            version = int(record["version"])
            try:
                loaded = self._loader(record)
            except Exception as exc:  # ModelLoadError, or a loader bug: either way the routing stays
                self._failed(record, exc)
                continue
            if self.registry.swap(loaded):
                delay_s = time.time() - loaded.published_ts / 1000
                MODEL_SWAP_DELAY.observe(max(delay_s, 0.0))
                logger.info("model %s version %d in use, %.3f s after it was created", name, version, delay_s)

    def _failed(self, record: Mapping[str, Any], exc: Exception) -> None:
        name, version = record["model"], int(record["version"])
        source = self.registry.source(name, version)
        self.registry.failed(name, version)
        MODEL_LOAD_FAILURES.labels(name).inc()
        logger.error(
            "model %s version %d at %s failed to load, routing unchanged: %s", name, version, source, exc
        )
        letter = DeadLetter(
            stage="serving.load",
            error=str(exc),
            error_type=type(exc).__name__,
            key=name.encode(),
            value=source.payload if source else None,
            source_topic=source.topic if source else self._models_topic,
            partition=source.partition if source else -1,
            offset=source.offset if source else -1,
        )
        try:
            self._dead_letter_sink().send(letter)
            if self._dl_producer is not None:
                self._dl_producer.flush(5.0)
        except Exception:
            logger.exception("could not publish the load failure of model %s version %d", name, version)

    def _dead_letter_sink(self) -> DeadLetterSink:
        if self._dead_letters is None:
            self._dl_producer = make_producer(self.settings)
            self._dead_letters = KafkaDeadLetters(self._dl_producer, topic(self.settings, "dead-letter"))
        return self._dead_letters
