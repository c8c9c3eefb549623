"""Loading a ``model_version`` record into a :class:`LoadedModel`, whatever its flavor and task.

:func:`load_model` checks the record's signature (when the :class:`LoadPolicy` has trusted keys), takes
the artifact inline or fetches it by URI, checks its digest, checks that the record fits the model's
definition (its task, and inputs the model has), builds the runtime for its flavor and warms it up on a
synthetic input typed from the definition. Only a model that has answered is ever handed to a caller.
:func:`make_loader` binds the definitions of a project's models and a policy into the one-argument
loader the serving follower calls.

Flavors are looked up in :data:`RUNTIME_BUILDERS`: ``river`` (:mod:`models.river_runtime`) and ``onnx``
(:mod:`models.onnx_runtime`). A builder receives the record with its artifact bytes already fetched and
checked, and the model's :class:`~models.inputs.ModelInputs`. What a runtime answers per task:
:class:`models.base.Output`.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.errors import ModelLoadError
from models.artifacts import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, record_artifact
from models.base import ModelRuntime, Output
from models.inputs import ModelInputs
from models.onnx_runtime import (
    CPU,
    CUDA,
    ONNX_FEATURES_KEY,
    ONNX_OUTPUT_NAME,
    OnnxRuntime,
    build_onnx,
    feature_matrix,
    feature_vector,
    onnx_providers,
)
from models.river_runtime import RiverRuntime, build_river
from models.signing import Verifier

logger = logging.getLogger(__name__)

__all__ = [
    "CPU",
    "CUDA",
    "ONNX_FEATURES_KEY",
    "ONNX_OUTPUT_NAME",
    "RUNTIME_BUILDERS",
    "LoadPolicy",
    "LoadedModel",
    "Loader",
    "ModelRuntime",
    "OnnxRuntime",
    "Output",
    "RiverRuntime",
    "feature_matrix",
    "feature_vector",
    "load_model",
    "make_loader",
    "onnx_providers",
    "view_versions_of",
]

# A builder turns a model_version record (artifact fetched and checked) and the model's inputs into a
# runtime, raising ModelLoadError when it cannot.
RuntimeBuilder = Callable[[Mapping[str, Any], ModelInputs], ModelRuntime]
RUNTIME_BUILDERS: dict[str, RuntimeBuilder] = {"river": build_river, "onnx": build_onnx}


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
    sha256: str = ""
    signed_by: str | None = None  # key_id of the verified signature; None when not verified
    task: str = "binary"
    classes: tuple[str, ...] = ()
    definitions_digest: str | None = None  # of the definitions it was trained with, when the record says
    # View name -> the version of the view it was trained with (its lineage); empty for records older
    # than lineage, which are served the views' current versions.
    view_versions: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "flavor": self.flavor,
            "task": self.task,
            "classes": list(self.classes),
            "provider": getattr(self.runtime, "provider", None),
            "loaded_at": self.loaded_at,
            "published_ts": self.published_ts,
            "feature_names": list(self.feature_names),
            "sha256": self.sha256,
            "signed_by": self.signed_by,
            "definitions_digest": self.definitions_digest,
            "view_versions": dict(self.view_versions),
        }


@dataclass(frozen=True)
class LoadPolicy:
    """How :func:`load_model` treats signatures and artifact URIs."""

    verifier: Verifier | None = None  # None: unsigned versions are accepted (logged once)
    fetch_timeout_s: float = DEFAULT_TIMEOUT_S
    max_artifact_bytes: int = DEFAULT_MAX_BYTES


_unverified_warned = threading.Event()

Loader = Callable[[Mapping[str, Any]], LoadedModel]


def load_model(
    record: Mapping[str, Any], inputs: ModelInputs, policy: LoadPolicy | None = None
) -> LoadedModel:
    """Build and warm up the model of a decoded ``model_version`` record, a version of ``inputs.model``.

    Raises :class:`ModelLoadError` for a record of another model or task, inputs the model does not
    have, an unknown flavor, a missing, refused or bad signature (when ``policy`` has trusted keys), an
    artifact that cannot be fetched, a digest mismatch, an artifact that does not load, or a model that
    fails to answer a synthetic input.
    """
    policy = policy or LoadPolicy()
    where = f"model {record.get('model')!r} v{record.get('version')}"
    flavor = str(record.get("flavor"))
    builder = RUNTIME_BUILDERS.get(flavor)
    if builder is None:
        raise ModelLoadError(f"{where}: unsupported flavor {flavor!r}; known: {sorted(RUNTIME_BUILDERS)}")
    _check_definition(where, record, inputs)
    started = time.perf_counter()
    signed_by = _check_signature(where, record, policy)
    blob = _artifact(where, record, policy)
    try:
        runtime = builder({**record, "artifact": blob}, inputs)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where} (flavor {flavor!r}): {exc}") from exc
    except Exception as exc:  # a builder's own failure must never take the follower down
        raise ModelLoadError(f"{where} (flavor {flavor!r}): {type(exc).__name__}: {exc}") from exc
    _warm_up(where, runtime, inputs)
    logger.info(
        "loaded model %s version %s (%s %s on %s, %s) in %.1f ms",
        record["model"],
        record["version"],
        inputs.task,
        flavor,
        runtime.provider,
        f"signed by {signed_by}" if signed_by else "signature not checked",
        (time.perf_counter() - started) * 1000,
    )
    return LoadedModel(
        name=str(record["model"]),
        version=int(record["version"]),
        flavor=flavor,
        runtime=runtime,
        feature_names=tuple(record.get("feature_names") or ()),
        loaded_at=time.time(),
        published_ts=int(record.get("created_ts") or 0),
        sha256=str(record["sha256"]),
        signed_by=signed_by,
        task=inputs.task,
        classes=tuple(str(c) for c in record.get("classes") or ()),
        definitions_digest=record.get("definitions_digest"),
        view_versions=view_versions_of(record),
    )


def view_versions_of(record: Mapping[str, Any]) -> dict[str, int]:
    """The view versions a ``model_version`` record was trained with (view name -> version); empty
    when the record predates lineage."""
    return {str(name): int(v) for name, v in (record.get("view_versions") or {}).items()}


def make_loader(models: Mapping[str, ModelInputs], policy: LoadPolicy | None = None) -> Loader:
    """A loader of records of ``models`` (by model name): :func:`load_model` with their inputs."""
    return functools.partial(_load_known, dict(models), policy or LoadPolicy())


def _load_known(
    models: Mapping[str, ModelInputs], policy: LoadPolicy, record: Mapping[str, Any]
) -> LoadedModel:
    inputs = models.get(str(record.get("model")))
    if inputs is None:
        raise ModelLoadError(
            f"model {record.get('model')!r} v{record.get('version')}: not a model of the definitions "
            f"(models: {', '.join(sorted(models)) or 'none'})"
        )
    return load_model(record, inputs, policy)


def _check_definition(where: str, record: Mapping[str, Any], inputs: ModelInputs) -> None:
    if record.get("model") != inputs.name:
        raise ModelLoadError(f"{where}: a record of another model than {inputs.name!r}")
    task = record.get("task") or "binary"
    if task != inputs.task:
        raise ModelLoadError(f"{where}: trained for a {task} task; the model is defined as {inputs.task}")
    unknown = [n for n in record.get("feature_names") or () if n not in inputs.types]
    if unknown:
        raise ModelLoadError(
            f"{where}: inputs {unknown} are not inputs of the model (its inputs: {', '.join(inputs.names)})"
        )


def _check_signature(where: str, record: Mapping[str, Any], policy: LoadPolicy) -> str | None:
    # Checked before any fetch: an unsigned record never makes serving download what it names.
    if policy.verifier is None:
        if not _unverified_warned.is_set():
            _unverified_warned.set()
            logger.warning(
                "no trusted keys configured (TIDE_SERVE_TRUSTED_KEYS_FILE): model versions are loaded "
                "without signature checks"
            )
        return None
    try:
        return policy.verifier.verify(record)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where}: signature refused: {exc}") from exc


def _artifact(where: str, record: Mapping[str, Any], policy: LoadPolicy) -> bytes:
    try:
        return record_artifact(record, timeout_s=policy.fetch_timeout_s, max_bytes=policy.max_artifact_bytes)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where}: {exc}") from exc


def check_output(task: str, out: Any) -> str | None:
    """Why ``out`` is not a valid answer for ``task``; None when it is."""
    if not isinstance(out, Output):
        return f"{out!r} is not an Output"
    if not isinstance(out.score, float) or not math.isfinite(out.score):
        return f"score {out.score!r} is not a finite number"
    if task == "binary" and not 0.0 <= out.score <= 1.0:
        return f"score {out.score!r} is not a probability"
    if task == "multiclass":
        probs = out.probabilities
        if probs is None:
            return "a multiclass answer needs class probabilities"
        if any(not math.isfinite(p) or not 0.0 <= p <= 1.0 for p in probs.values()):
            return f"class probabilities {probs} are not all probabilities"
        if probs and (out.label not in probs or probs[out.label] != out.score):
            return f"label {out.label!r} with score {out.score} is not a class of {probs}"
        if probs and out.score < max(probs.values()):
            return f"label {out.label!r} is not the most probable class of {probs}"
    return None


def _warm_up(where: str, runtime: ModelRuntime, inputs: ModelInputs) -> None:
    """Answer a neutral input, alone and as a batch, so a broken model fails here and not on a request."""
    x = inputs.synthetic()
    try:
        outputs = [runtime.predict_one(x), *runtime.predict_many([x, x])]
    except Exception as exc:
        raise ModelLoadError(f"{where}: warm-up scoring failed: {type(exc).__name__}: {exc}") from exc
    for out in outputs:
        problem = check_output(inputs.task, out)
        if problem is not None:
            raise ModelLoadError(f"{where}: warm-up answer refused: {problem}")
    if len(outputs) != 3 or any(
        abs(o.score - outputs[0].score) > 1e-6 * max(1.0, abs(outputs[0].score))
        or o.label != outputs[0].label
        for o in outputs[1:]
    ):
        raise ModelLoadError(f"{where}: warm-up batch answers {outputs[1:]} disagree with {outputs[0]}")
