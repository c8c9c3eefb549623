"""Model runtimes: one ``predict_one`` over a feature map, whatever the artifact format.

A :class:`LoadedModel` is built from a ``model_version`` record by :func:`load_model`, which checks the
artifact's digest, builds the runtime for its flavor and warms it up on a synthetic input. Only a model
that has scored once is ever handed to the registry.

Flavors are looked up in :data:`RUNTIME_BUILDERS`; an ONNX runtime plugs in there by adding a builder
for ``"onnx"`` (same signature as :func:`build_river`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from infra.errors import ModelLoadError, TrainingError
from online_training import model as river_model
from serving.features import synthetic_input

logger = logging.getLogger(__name__)


class ModelRuntime(Protocol):
    """A loaded model: scores one feature map."""

    def predict_one(self, x: Mapping[str, Any]) -> float:
        """The probability that ``x`` is fraud, in [0, 1]."""
        ...


class RiverRuntime:
    """A river classifier; the score is the probability of the ``True`` class."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def predict_one(self, x: Mapping[str, Any]) -> float:
        return float(self.model.predict_proba_one(x).get(True, 0.0))


# A builder turns a model_version record into a runtime, raising ModelLoadError when it cannot.
RuntimeBuilder = Callable[[Mapping[str, Any]], ModelRuntime]


def build_river(record: Mapping[str, Any]) -> ModelRuntime:
    try:
        return RiverRuntime(river_model.load(bytes(record["artifact"]), record["sha256"]))
    except TrainingError as exc:
        raise ModelLoadError(str(exc)) from exc


RUNTIME_BUILDERS: dict[str, RuntimeBuilder] = {"river": build_river}


@dataclass(frozen=True)
class LoadedModel:
    """A model version ready to score. Immutable: the registry replaces it whole, never edits it."""

    name: str
    version: int
    flavor: str
    runtime: ModelRuntime
    feature_names: tuple[str, ...]
    loaded_at: float  # wall time the load finished, seconds since the epoch
    published_ts: int  # the record's created_ts, ms since the epoch

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "flavor": self.flavor,
            "loaded_at": self.loaded_at,
            "published_ts": self.published_ts,
            "feature_names": list(self.feature_names),
        }


def load_model(record: Mapping[str, Any]) -> LoadedModel:
    """Build and warm up the model of a decoded ``model_version`` record.

    Raises :class:`ModelLoadError` for an unknown flavor, an artifact that is not inline, a digest
    mismatch, an artifact that does not load, or a model that fails to score a synthetic input.
    """
    where = f"model {record.get('model')!r} v{record.get('version')}"
    flavor = str(record.get("flavor"))
    builder = RUNTIME_BUILDERS.get(flavor)
    if builder is None:
        raise ModelLoadError(f"{where}: unsupported flavor {flavor!r}; known: {sorted(RUNTIME_BUILDERS)}")
    if not record.get("artifact") and record.get("artifact_uri"):
        raise ModelLoadError(f"{where}: artifacts by URI are not supported ({record['artifact_uri']!r})")
    started = time.perf_counter()
    try:
        runtime = builder(record)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where}: {exc}") from exc
    except Exception as exc:  # a builder's own failure must never take the follower down
        raise ModelLoadError(f"{where}: {type(exc).__name__}: {exc}") from exc
    feature_names = tuple(record.get("feature_names") or ())
    _warm_up(where, runtime, feature_names)
    logger.info(
        "loaded model %s version %s (%s) in %.1f ms",
        record["model"],
        record["version"],
        flavor,
        (time.perf_counter() - started) * 1000,
    )
    return LoadedModel(
        name=record["model"],
        version=int(record["version"]),
        flavor=flavor,
        runtime=runtime,
        feature_names=feature_names,
        loaded_at=time.time(),
        published_ts=int(record.get("created_ts") or 0),
    )


def _warm_up(where: str, runtime: ModelRuntime, feature_names: tuple[str, ...]) -> None:
    """Score a neutral input once, so a broken model fails here and not on the first request."""
    try:
        score = runtime.predict_one(synthetic_input(feature_names))
    except Exception as exc:
        raise ModelLoadError(f"{where}: warm-up scoring failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(score, float) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise ModelLoadError(f"{where}: warm-up score {score!r} is not a probability")
