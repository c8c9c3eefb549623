"""The thread that keeps a :class:`~serving.registry.ModelRegistry` current from the topics.

:class:`ModelFollower` replays the models, deployments and canary-verdicts topics from the beginning on a
daemon thread: model versions are remembered, deployments update the traffic policy (or are held until
the version they name is read, and refused after a bound: serving.ledger), verdicts are kept with the
version they judged, and the versions the
policy wants are loaded (newest first, each pinned to its lineage: :mod:`serving.lineage`) and swapped
in. A version that fails to load is logged, counted and published to the dead-letter topic, and the
routing that was serving keeps serving; one whose lineage does not fit the definitions is refused and
reconsidered when they change (:meth:`ModelFollower.reconsider`). The models followed change with the
definitions (:meth:`ModelFollower.follow`): the records of a model added are replayed from the start of
the topics, each applied once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, Producer
from prometheus_client import Counter, Histogram

from infra.deadletter import DeadLetterSink, KafkaDeadLetters
from infra.errors import DeploymentError, SchemaError
from infra.kafka import make_producer, messages, replay_reader
from infra.letters import DeadLetter
from infra.topics import TOPICS, topic
from models.inputs import ModelInputs
from models.runtime import Loader
from schemas import codec
from serving.lineage import Lineage, LineageMismatch
from serving.registry import ModelRegistry, Source
from serving.settings import ServeSettings

logger = logging.getLogger(__name__)

MODEL_LOAD_FAILURES = Counter(
    "tide_model_load_failures_total", "Model versions that failed to load or warm up", ["model"]
)
MODEL_RECORDS_INVALID = Counter(
    "tide_model_records_invalid_total", "Records on the models or deployments topic that were refused"
)
MODEL_SWAP_DELAY = Histogram(
    "tide_model_swap_delay_seconds",
    "Time from a model version's creation to its swap into serving",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)


ConsumerFactory = Callable[[ServeSettings], Consumer]
_PER_MODEL = ("model_version", "deployment", "canary_verdict")  # records skipped for models not followed


def _state_reader(settings: ServeSettings) -> Consumer:
    names = ("models", "deployments", "canary-verdicts")
    return replay_reader(settings, {topic(settings, n): TOPICS[n].partitions for n in names})


class ModelFollower:
    """Follows the models and deployments topics on a daemon thread and keeps a registry current."""

    RETRY_S = 1.0

    def __init__(
        self,
        settings: ServeSettings,
        registry: ModelRegistry,
        *,
        loader: Loader | None = None,
        lineage: Lineage | None = None,
        models: Collection[str] | None = None,
        consumer_factory: ConsumerFactory = _state_reader,
        dead_letters: DeadLetterSink | None = None,
    ) -> None:
        """``lineage``: loads each version pinned to its lineage under the definitions served (a
        :class:`LineageMismatch` refuses it); or ``loader``, which builds a version from its record with
        the model's current inputs (``models.runtime.make_loader``). ``models``: the model names
        followed; records of others on the topics are skipped (None: every model); :meth:`follow`
        changes them while running."""
        if (loader is None) == (lineage is None):
            raise ValueError("give a loader or a lineage, not both")
        self.settings = settings
        self.registry = registry
        self._consumer_factory = consumer_factory
        self._loader = loader
        self._lineage = lineage
        self._models = frozenset(models) if models is not None else None
        self._skipped: set[str] = set()
        # Replays: the last offset read per (topic, partition), the same when the current reader started
        # (records up to it were applied before), and per model added while running the last offset of its
        # own applied so far: a replay applies each record once.
        self._seen: dict[tuple[str, int], int] = {}
        self._replayed_to: dict[tuple[str, int], int] = {}
        self._fresh: dict[str, dict[tuple[str, int], int]] = {}
        self._reconsider: set[str] = set()
        self._lock = threading.Lock()  # guards the model set, _fresh and _reconsider (set by other threads)
        self._replay = threading.Event()
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

    def follow(self, models: Collection[str]) -> None:
        """Follow exactly ``models`` from now on: the records of a model added are replayed from the start
        of the topics (its versions and deployments, each applied once), those of a model removed are
        skipped."""
        with self._lock:
            wanted = frozenset(models)
            added = wanted - self._models if self._models is not None else frozenset()
            for name in (self._models or frozenset()) - wanted:
                self._fresh.pop(name, None)
            self._models = wanted
            self._skipped -= wanted
            for name in added:
                self._fresh[name] = {}
        if added:
            logger.info("following models %s from the start of the topics", ", ".join(sorted(added)))
            self._replay.set()

    def reconsider(self, names: Iterable[str]) -> None:
        """Load what ``names`` want again soon (on the follower's thread): after their definitions
        changed, versions refused before may fit."""
        with self._lock:
            self._reconsider.update(names)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                consumer = self._consumer_factory(self.settings)
            except Exception:
                logger.exception("cannot create a reader for the models topic; retrying")
                self._stop.wait(self.RETRY_S)
                continue
            self._replay.clear()
            with self._lock:
                self._replayed_to = dict(self._seen)
            try:
                for batch in messages(consumer):
                    if self._stop.is_set() or self._replay.is_set():
                        break  # a replay starts over from the beginning with a new reader
                    self.apply(
                        (m.value() or b"", Source(m.topic() or "", m.partition() or 0, m.offset() or 0))
                        for m in batch
                    )
                    self.registry.expire()  # deployments held too long for their version are refused
            except Exception:
                # Replaying from the start is safe: records already applied are skipped.
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
        with self._lock:
            touched |= self._reconsider
            self._reconsider.clear()
        for name in sorted(touched):
            self._converge(name)

    def _first_time(self, name: str, source: Source) -> bool:
        """Whether the record at ``source`` of model ``name`` is applied (not applied before)."""
        key, offset = (source.topic, source.partition), source.offset
        with self._lock:
            self._seen[key] = max(self._seen.get(key, -1), offset)
            fresh = self._fresh.get(name)
            if offset > self._replayed_to.get(key, -1):  # not read before
                if fresh is not None:
                    fresh[key] = max(fresh.get(key, -1), offset)
                return True
            if fresh is not None and offset > fresh.get(key, -1):  # replayed for a model added
                fresh[key] = offset
                return True
            return False

    def _apply_one(self, payload: bytes, source: Source) -> list[str]:
        try:
            record = codec.decode(payload)
        except SchemaError as exc:
            MODEL_RECORDS_INVALID.inc()
            logger.warning("skipping undecodable record at %s: %s", source, exc)
            return []
        kind = codec.record_name(payload)
        name = str(record.get("model"))
        if not self._first_time(name, source):
            return []
        models = self._models
        if models is not None and kind in _PER_MODEL and name not in models:
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
                self.registry.deploy(record, source)  # its outcome is logged and kept by the registry
            except DeploymentError as exc:
                MODEL_RECORDS_INVALID.inc()
                logger.error("refusing deployment at %s (%s): %s", source, record, exc)
                return []
        elif kind == "canary_verdict":
            self.registry.verdict(record)
            return []
        else:
            MODEL_RECORDS_INVALID.inc()
            logger.warning(
                "skipping a %s record at %s: not a model version, deployment or verdict", kind, source
            )
            return []
        return [record["model"]]

    def _converge(self, name: str) -> None:
        # Each load changes what is wanted (a failure falls back to an older version): ask again.
        while wanted := self.registry.wanted(name):
            record = wanted[0]
            version = int(record["version"])
            inputs: ModelInputs | None = None
            try:
                if self._lineage is not None:
                    loaded, inputs = self._lineage.load(record)
                else:
                    assert self._loader is not None
                    loaded = self._loader(record)
            except LineageMismatch as exc:  # depends on the definitions: reconsidered when they change
                self.registry.refuse(name, version, str(exc))
                continue
            except Exception as exc:  # ModelLoadError, or a loader bug: either way the routing stays
                self._failed(record, exc)
                continue
            if self.registry.swap(loaded, inputs):
                delay_s = time.time() - loaded.published_ts / 1000
                MODEL_SWAP_DELAY.observe(max(delay_s, 0.0))
                logger.info("model %s version %d in use, %.3f s after it was created", name, version, delay_s)

    def _failed(self, record: Mapping[str, Any], exc: Exception) -> None:
        name, version = record["model"], int(record["version"])
        source = self.registry.source(name, version)
        self.registry.failed(name, version, f"{type(exc).__name__}: {exc}")
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
