"""Model runtimes: ``predict_one``/``predict_many`` over feature maps, whatever the artifact format.

A :class:`LoadedModel` is built from a ``model_version`` record by :func:`load_model`, which checks the
record's signature (when trusted keys are configured), takes the artifact inline or fetches it by URI,
checks its digest, builds the runtime for its flavor and warms it up on a synthetic input. Only a model
that has scored is ever handed to the registry. :func:`make_loader` binds the serving settings (trusted
keys, fetch timeout and size) into a one-argument loader for the model follower.

Flavors are looked up in :data:`RUNTIME_BUILDERS`: ``river`` (a pickled river classifier) and ``onnx``
(:class:`OnnxRuntime`). A builder receives the record with its artifact bytes already fetched and checked.

ONNX input contract: the record's ``feature_names`` in order become one float32 row; ``None`` or a missing
feature is 0.0 and a boolean is 0.0/1.0. Request fields typed as strings by the event schema (``category``,
``country``) cannot be inputs: a model naming one is refused at load, because a string has no float32
value and an ONNX model that wants it must take it already encoded as a number. The model has one float
input ``[batch, len(feature_names)]``; its score is the last column of its output (named ``probability``
if there is one, else the first): ``[batch, 1]`` (a probability) or ``[batch, 2]`` (class probabilities).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from models.artifacts import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, record_artifact
from infra.errors import ModelLoadError, TrainingError
from models.signing import Verifier
from examples.fraud import model as river_model
from models.inputs import REQUEST_FIELD_TYPES, synthetic_input
from serving.settings import ServeSettings

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Metadata key an exporter may set (JSON list of input names); checked against the record when present.
ONNX_FEATURES_KEY = "tide.feature_names"
ONNX_OUTPUT_NAME = "probability"


class ModelRuntime(Protocol):
    """A loaded model: scores feature maps."""

    provider: str  # where it runs: "python" (river), or the onnxruntime execution provider

    def predict_one(self, x: Mapping[str, Any]) -> float:
        """The probability that ``x`` is fraud, in [0, 1]."""
        ...

    def predict_many(self, xs: Sequence[Mapping[str, Any]]) -> list[float]:
        """:meth:`predict_one` of each, in order (one model call where the runtime can batch)."""
        ...


class RiverRuntime:
    """A river classifier; the score is the probability of the ``True`` class."""

    provider = "python"

    def __init__(self, model: Any) -> None:
        self.model = model

    def predict_one(self, x: Mapping[str, Any]) -> float:
        return float(self.model.predict_proba_one(x).get(True, 0.0))

    def predict_many(self, xs: Sequence[Mapping[str, Any]]) -> list[float]:
        return [self.predict_one(x) for x in xs]


def feature_vector(x: Mapping[str, Any], names: Sequence[str]) -> list[float]:
    """``x``'s values of ``names`` as floats: None or missing -> 0.0, booleans -> 0.0/1.0."""
    return [float(x.get(name) or 0.0) for name in names]


def feature_matrix(xs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """:func:`feature_vector` of each row, as a float32 ``[len(xs), len(names)]`` array."""
    return np.array([feature_vector(x, names) for x in xs], dtype=np.float32).reshape(len(xs), len(names))


def onnx_providers(available: Sequence[str] | None = None) -> list[str]:
    """CUDA first when onnxruntime offers it (``onnxruntime-gpu`` on a GPU node), else CPU only."""
    available = ort.get_available_providers() if available is None else available
    return [CUDA, CPU] if CUDA in available else [CPU]


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # One request is one small graph: a thread pool costs more in hand-offs than it saves, and the
    # serving workers already use the cores.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; load failures are raised, not logged by onnxruntime
    return options


class _Bound:
    """One thread's pre-bound buffers: predict_one fills the input row in place, runs, reads the output."""

    def __init__(
        self, session: ort.InferenceSession, input_name: str, output_name: str, width: int, out_shape: Any
    ) -> None:
        self.row = np.zeros((1, width), dtype=np.float32)
        out = np.zeros(out_shape, dtype=np.float32)
        self.score = out.reshape(-1)  # a view of the output buffer: the score is its last element
        self.binding = session.io_binding()
        self.binding.bind_cpu_input(input_name, self.row)
        self.binding.bind_output(output_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self._out = out  # keeps the bound memory alive as long as the binding


class OnnxRuntime:
    """An onnxruntime session over one float32 input row per instance (see the module docstring)."""

    def __init__(
        self, artifact: bytes, feature_names: Sequence[str], *, providers: Sequence[str] | None = None
    ) -> None:
        self.feature_names = tuple(feature_names)
        strings = [n for n in self.feature_names if REQUEST_FIELD_TYPES.get(n) == "string"]
        if strings:
            raise ModelLoadError(
                f"features {strings} are strings; ONNX models take numeric inputs only "
                "(encode them as numbers before the model, or inside a river pipeline)"
            )
        try:
            self.session = ort.InferenceSession(
                artifact, sess_options=_session_options(), providers=list(providers or onnx_providers())
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"not a loadable ONNX model: {type(exc).__name__}: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        self._input = self._check_input()
        self._output = self._pick_output()
        self._check_metadata()
        self._run = self.session.run
        self._outputs = [self._output]
        self._out_shape = self._probe()
        self._local = threading.local()
        # Pre-bound host buffers on CPU only: with CUDA every run copies to and from the device anyway,
        # and plain run() is the path onnxruntime documents for host arrays there.
        self._bind = self.provider == CPU

    def _check_input(self) -> str:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"ONNX model has {len(inputs)} inputs; one float tensor is expected")
        inp = inputs[0]
        shape = list(inp.shape or [])
        if inp.type != "tensor(float)" or len(shape) != 2:
            raise ModelLoadError(
                f"ONNX input {inp.name!r} is {inp.type} {shape}; expected tensor(float) [batch, features]"
            )
        if isinstance(shape[1], int) and shape[1] != len(self.feature_names):
            raise ModelLoadError(
                f"ONNX input {inp.name!r} takes {shape[1]} features; the record names "
                f"{len(self.feature_names)}"
            )
        return str(inp.name)

    def _pick_output(self) -> str:
        outputs = self.session.get_outputs()
        chosen = next((o for o in outputs if o.name == ONNX_OUTPUT_NAME), outputs[0])
        if chosen.type != "tensor(float)":
            raise ModelLoadError(
                f"ONNX output {chosen.name!r} is {chosen.type}; expected a float tensor of probabilities "
                "(a classifier converted with a ZipMap needs zipmap=False)"
            )
        shape = list(chosen.shape or [])
        width = shape[-1] if len(shape) == 2 else 1
        if len(shape) not in (1, 2) or (isinstance(width, int) and width not in (1, 2)):
            raise ModelLoadError(
                f"ONNX output {chosen.name!r} has shape {shape}; expected [batch], [batch, 1] or [batch, 2]"
            )
        return str(chosen.name)

    def _probe(self) -> tuple[int, ...]:
        """The output shape of one row (the model's output width is only known for sure by running it)."""
        zeros = np.zeros((1, len(self.feature_names)), dtype=np.float32)
        try:
            out = np.asarray(self._run(self._outputs, {self._input: zeros})[0])
        except Exception as exc:
            raise ModelLoadError(f"ONNX model does not run on one row: {type(exc).__name__}: {exc}") from exc
        if out.size not in (1, 2) or out.ndim not in (1, 2):
            raise ModelLoadError(
                f"ONNX output for one row has shape {list(out.shape)}; expected 1 or 2 values"
            )
        return tuple(out.shape)

    def _check_metadata(self) -> None:
        declared = self.session.get_modelmeta().custom_metadata_map.get(ONNX_FEATURES_KEY)
        if declared is None:
            return
        if json.loads(declared) != list(self.feature_names):
            raise ModelLoadError(
                f"the ONNX model was exported for inputs {declared}; the record names "
                f"{list(self.feature_names)} (a different input order would score garbage)"
            )

    def _bound(self) -> _Bound:
        try:
            bound: _Bound = self._local.bound
        except AttributeError:
            bound = self._local.bound = _Bound(
                self.session, self._input, self._output, len(self.feature_names), self._out_shape
            )
        return bound

    def predict_one(self, x: Mapping[str, Any]) -> float:
        if not self._bind:
            return self.predict_many((x,))[0]
        bound = self._bound()
        bound.row[0] = feature_vector(x, self.feature_names)
        self.session.run_with_iobinding(bound.binding)
        return float(bound.score[-1])

    def predict_many(self, xs: Sequence[Mapping[str, Any]]) -> list[float]:
        if not xs:
            return []
        out = self._run(self._outputs, {self._input: feature_matrix(xs, self.feature_names)})[0]
        return [float(v) for v in np.asarray(out).reshape(len(xs), -1)[:, -1]]


# A builder turns a model_version record (artifact fetched and checked) into a runtime, raising
# ModelLoadError when it cannot.
RuntimeBuilder = Callable[[Mapping[str, Any]], ModelRuntime]


def build_river(record: Mapping[str, Any]) -> ModelRuntime:
    try:
        return RiverRuntime(river_model.load(bytes(record["artifact"]), record["sha256"]))
    except TrainingError as exc:
        raise ModelLoadError(str(exc)) from exc


def build_onnx(record: Mapping[str, Any]) -> ModelRuntime:
    return OnnxRuntime(bytes(record["artifact"]), record.get("feature_names") or ())


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

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "flavor": self.flavor,
            "provider": getattr(self.runtime, "provider", None),
            "loaded_at": self.loaded_at,
            "published_ts": self.published_ts,
            "feature_names": list(self.feature_names),
            "sha256": self.sha256,
            "signed_by": self.signed_by,
        }


@dataclass(frozen=True)
class LoadPolicy:
    """How :func:`load_model` treats signatures and artifact URIs."""

    verifier: Verifier | None = None  # None: unsigned versions are accepted (logged once)
    fetch_timeout_s: float = DEFAULT_TIMEOUT_S
    max_artifact_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> LoadPolicy:
        """Read the trusted keys once (ConfigError naming the file when they do not load)."""
        keys = settings.serve_trusted_keys_file
        return cls(
            verifier=Verifier.from_pem_file(Path(keys)) if keys else None,
            fetch_timeout_s=settings.serve_artifact_timeout_s,
            max_artifact_bytes=settings.serve_artifact_max_bytes,
        )


_unverified_warned = threading.Event()


def load_model(record: Mapping[str, Any], policy: LoadPolicy | None = None) -> LoadedModel:
    """Build and warm up the model of a decoded ``model_version`` record.

    Raises :class:`ModelLoadError` for an unknown flavor, a missing, refused or bad signature (when
    ``policy`` has trusted keys), an artifact that cannot be fetched, a digest mismatch, an artifact that
    does not load, or a model that fails to score a synthetic input.
    """
    policy = policy or LoadPolicy()
    where = f"model {record.get('model')!r} v{record.get('version')}"
    flavor = str(record.get("flavor"))
    builder = RUNTIME_BUILDERS.get(flavor)
    if builder is None:
        raise ModelLoadError(f"{where}: unsupported flavor {flavor!r}; known: {sorted(RUNTIME_BUILDERS)}")
    started = time.perf_counter()
    signed_by = _check_signature(where, record, policy)
    blob = _artifact(where, record, policy)
    try:
        runtime = builder({**record, "artifact": blob})
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where} (flavor {flavor!r}): {exc}") from exc
    except Exception as exc:  # a builder's own failure must never take the follower down
        raise ModelLoadError(f"{where} (flavor {flavor!r}): {type(exc).__name__}: {exc}") from exc
    feature_names = tuple(record.get("feature_names") or ())
    _warm_up(where, runtime, feature_names)
    logger.info(
        "loaded model %s version %s (%s on %s, %s) in %.1f ms",
        record["model"],
        record["version"],
        flavor,
        runtime.provider,
        f"signed by {signed_by}" if signed_by else "signature not checked",
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
        sha256=str(record["sha256"]),
        signed_by=signed_by,
    )


def make_loader(settings: ServeSettings) -> Callable[[Mapping[str, Any]], LoadedModel]:
    """:func:`load_model` with the policy of ``settings`` (keys read now, so bad ones fail at start-up)."""
    return functools.partial(load_model, policy=LoadPolicy.from_settings(settings))


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


def _warm_up(where: str, runtime: ModelRuntime, feature_names: tuple[str, ...]) -> None:
    """Score a neutral input, alone and as a batch, so a broken model fails here and not on a request."""
    x = synthetic_input(feature_names)
    try:
        scores = [runtime.predict_one(x), *runtime.predict_many([x, x])]
    except Exception as exc:
        raise ModelLoadError(f"{where}: warm-up scoring failed: {type(exc).__name__}: {exc}") from exc
    for score in scores:
        if not isinstance(score, float) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise ModelLoadError(f"{where}: warm-up score {score!r} is not a probability")
    if len(scores) != 3 or abs(scores[1] - scores[0]) > 1e-6:
        raise ModelLoadError(f"{where}: warm-up batch scores {scores[1:]} disagree with {scores[0]}")
