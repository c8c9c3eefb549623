"""Which model version serves each model name, and the thread that keeps it current.

Swap atomicity: :class:`ModelRegistry` keeps one immutable :class:`LoadedModel` per name in a plain
dict. A swap replaces the dict value in one assignment (atomic under the GIL); a request calls
:meth:`ModelRegistry.get` once and scores with that object to the end, so a swap never changes the model
under an in-flight request, and no request ever sees a half-loaded model (loading and warm-up finish
before the assignment). Readers take no lock; writers serialise on one so "newer than current" checks
and the assignment happen together.

:class:`ModelFollower` replays the models topic from the beginning on a daemon thread and swaps in every
version newer than the current one. A version that fails to load is logged and counted, and the model
that was serving keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, Message
from prometheus_client import Counter, Gauge, Histogram

from infra.errors import SchemaError, ServingError
from schemas import codec
from serving.runtime import LoadedModel, load_model
from serving.settings import ServeSettings
from streams.kafka import messages, reader_from_beginning
from streams.topics import TOPICS, topic

logger = logging.getLogger(__name__)

MODEL_SWAPS = Counter("tide_model_swaps_total", "Model versions swapped in to serve", ["model"])
MODEL_LOAD_FAILURES = Counter(
    "tide_model_load_failures_total", "Model versions that failed to load or warm up", ["model"]
)
MODEL_RECORDS_INVALID = Counter(
    "tide_model_records_invalid_total", "Records on the models topic that could not be decoded"
)
MODEL_VERSION = Gauge("tide_model_version", "Version of the model currently serving", ["model"])
MODEL_SWAP_DELAY = Histogram(
    "tide_model_swap_delay_seconds",
    "Time from a model version's creation to its swap into serving",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)


class ModelRegistry:
    """The current :class:`LoadedModel` of each model name."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._known: set[str] = set(known)
        self._changed = threading.Condition()

    def get(self, name: str) -> LoadedModel | None:
        """The model serving ``name`` now; read it once per request and keep using that object."""
        return self._models.get(name)

    def is_known(self, name: str) -> bool:
        """Whether ``name`` is a model this service serves (loaded or not yet)."""
        return name in self._known or name in self._models

    def declare(self, name: str) -> None:
        """Mark ``name`` as served, before any version of it has loaded."""
        self._known.add(name)

    def models(self) -> list[LoadedModel]:
        """A snapshot of every loaded model, by name."""
        return [self._models[name] for name in sorted(self._models)]

    def swap(self, model: LoadedModel, *, only_newer: bool = True) -> bool:
        """Serve ``model`` from now on; with ``only_newer``, only if it is newer than the current one."""
        with self._changed:
            current = self._models.get(model.name)
            if only_newer and current is not None and model.version <= current.version:
                return False
            self._known.add(model.name)
            self._models[model.name] = model  # the one atomic step readers can observe
            self._changed.notify_all()
        MODEL_SWAPS.labels(model.name).inc()
        MODEL_VERSION.labels(model.name).set(model.version)
        logger.info(
            "model %s now serving version %d (was %s)",
            model.name,
            model.version,
            current.version if current else "none",
        )
        return True

    def wait_for(self, name: str, version: int | None = None, timeout: float = 10.0) -> LoadedModel:
        """Block until ``name`` serves ``version`` or newer (any when None); ServingError on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                current = self._models.get(name)
                if current is not None and (version is None or current.version >= version):
                    return current
                left = deadline - time.monotonic()
                if left <= 0:
                    have = current.version if current else None
                    raise ServingError(
                        f"model {name!r} version {version} not loaded in {timeout} s (serving {have})"
                    )
                self._changed.wait(left)


def _where(msg: Message) -> str:
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


ConsumerFactory = Callable[[ServeSettings], Consumer]


def _models_reader(settings: ServeSettings) -> Consumer:
    return reader_from_beginning(settings, topic(settings, "models"), TOPICS["models"].partitions)


class ModelFollower:
    """Follows the models topic on a daemon thread and swaps newer versions into a registry."""

    RETRY_S = 1.0

    def __init__(
        self,
        settings: ServeSettings,
        registry: ModelRegistry,
        *,
        consumer_factory: ConsumerFactory = _models_reader,
        loader: Callable[[Mapping[str, Any]], LoadedModel] = load_model,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._consumer_factory = consumer_factory
        self._loader = loader
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
        name = topic(self.settings, "models")
        while not self._stop.is_set():
            try:
                consumer = self._consumer_factory(self.settings)
            except Exception:
                logger.exception("cannot create a reader for %s; retrying", name)
                self._stop.wait(self.RETRY_S)
                continue
            try:
                for batch in messages(consumer):
                    if self._stop.is_set():
                        break
                    self.apply((m.value() or b"", _where(m)) for m in batch)
            except Exception:
                # Replaying from the start is safe: versions not newer than the current one are skipped.
                logger.exception("model follower failed reading %s; restarting from the beginning", name)
                self._stop.wait(self.RETRY_S)
            finally:
                consumer.close()

    def apply(self, payloads: Iterable[tuple[bytes, str]]) -> None:
        """Handle a batch of ``(payload, where)`` records from the models topic.

        Per model only the newest loadable version of the batch is loaded (a replay of a long history
        loads one model, not all of them); when it fails, the next newest is tried, down to the version
        already serving.
        """
        by_model: dict[str, list[tuple[dict[str, Any], str]]] = defaultdict(list)
        for payload, where in payloads:
            try:
                record = codec.decode(payload, expected="model_version")
            except SchemaError as exc:
                MODEL_RECORDS_INVALID.inc()
                logger.warning("skipping undecodable record at %s: %s", where, exc)
                continue
            self.registry.declare(record["model"])
            by_model[record["model"]].append((record, where))
        for model, candidates in by_model.items():
            candidates.sort(key=lambda c: c[0]["version"], reverse=True)
            for record, where in candidates:
                current = self.registry.get(model)
                if current is not None and record["version"] <= current.version:
                    break
                if self._load_and_swap(record, where):
                    break

    def _load_and_swap(self, record: Mapping[str, Any], where: str) -> bool:
        model, version = record["model"], record["version"]
        try:
            loaded = self._loader(record)
        except Exception as exc:  # ModelLoadError, or a loader bug: either way the old model stays
            MODEL_LOAD_FAILURES.labels(model).inc()
            logger.error(
                "model %s version %s at %s failed to load, keeping the current one: %s",
                model,
                version,
                where,
                exc,
            )
            return False
        if not self.registry.swap(loaded):
            return False
        delay_s = time.time() - loaded.published_ts / 1000
        MODEL_SWAP_DELAY.observe(max(delay_s, 0.0))
        logger.info(
            "swapped in model %s version %s from %s (%.3f s after it was created)",
            model,
            version,
            where,
            delay_s,
        )
        return True
