"""The ``onnx`` flavor: an onnxruntime session over one float32 row of numeric inputs per instance.

Input contract: the record's ``feature_names`` in order become one float32 row; ``None`` or a missing
input is 0.0, a boolean is 0.0/1.0 and a value beyond float32's range is clamped to it. Inputs typed as
strings by the model's definition cannot be inputs: a record naming one is refused at load, because a
string has no float32 value and an ONNX model that wants it must take it already encoded as a number.
The model has one float input ``[batch, len(feature_names)]``; its output is the one named
``probability`` if there is one, else the first:

- ``binary``: ``[batch]``, ``[batch, 1]`` (the probability of the positive class) or ``[batch, 2]``
  (class probabilities, the positive class last);
- ``regression``: ``[batch]`` or ``[batch, 1]``, the value;
- ``multiclass``: ``[batch, len(classes)]``, the probabilities of the record's ``classes`` in order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from infra.errors import ModelLoadError
from models.base import ModelRuntime, Output
from models.inputs import ModelInputs

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Metadata key an exporter may set (JSON list of input names); checked against the record when present.
ONNX_FEATURES_KEY = "tide.feature_names"
ONNX_OUTPUT_NAME = "probability"
TASKS = ("binary", "multiclass", "regression")


_F32_MAX = float(np.finfo(np.float32).max)


def feature_vector(x: Mapping[str, Any], names: Sequence[str]) -> list[float]:
    """``x``'s values of ``names`` as floats: None or missing -> 0.0, booleans -> 0.0/1.0, values beyond
    float32's range clamped to it (a saturating cast: a huge double is the largest float32, not inf)."""
    top, bottom = _F32_MAX, -_F32_MAX
    return [min(max(float(x.get(name) or 0.0), bottom), top) for name in names]


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
        self.out = out.reshape(-1)  # a view of the output buffer: one instance's output values
        self.binding = session.io_binding()
        self.binding.bind_cpu_input(input_name, self.row)
        self.binding.bind_output(output_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self._out = out  # keeps the bound memory alive as long as the binding


class OnnxRuntime:
    """An onnxruntime session for one task (see the module docstring).

    ``strings``: those of ``feature_names`` whose values are strings (refused: see the module
    docstring); ``classes``: a multiclass model's classes, in output order.
    """

    def __init__(
        self,
        artifact: bytes,
        feature_names: Sequence[str],
        *,
        task: str = "binary",
        classes: Sequence[str] = (),
        strings: Sequence[str] = (),
        providers: Sequence[str] | None = None,
    ) -> None:
        self.feature_names = tuple(feature_names)
        self.task = task
        self.classes = tuple(str(c) for c in classes)
        if task not in TASKS:
            raise ModelLoadError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
        if task == "multiclass" and len(self.classes) < 2:
            raise ModelLoadError(
                "a multiclass ONNX model needs the record's classes (two or more), in output order"
            )
        if strings:
            raise ModelLoadError(
                f"inputs {list(strings)} are strings; ONNX models take numeric inputs only "
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

    def _widths(self) -> tuple[int, ...]:
        """Output values per instance this task accepts."""
        if self.task == "binary":
            return (1, 2)
        if self.task == "regression":
            return (1,)
        return (len(self.classes),)

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
                f"ONNX input {inp.name!r} takes {shape[1]} features; "
                f"the record names {len(self.feature_names)}"
            )
        return str(inp.name)

    def _pick_output(self) -> str:
        outputs = self.session.get_outputs()
        chosen = next((o for o in outputs if o.name == ONNX_OUTPUT_NAME), outputs[0])
        if chosen.type != "tensor(float)":
            raise ModelLoadError(
                f"ONNX output {chosen.name!r} is {chosen.type}; expected a float tensor "
                "(a classifier converted with a ZipMap needs zipmap=False)"
            )
        shape = list(chosen.shape or [])
        width = shape[-1] if len(shape) == 2 else 1
        if len(shape) not in (1, 2) or (isinstance(width, int) and width not in self._widths()):
            expected = " or ".join(f"[batch, {w}]" for w in self._widths())
            if 1 in self._widths():
                expected = f"[batch], {expected}"
            raise ModelLoadError(
                f"ONNX output {chosen.name!r} has shape {shape}; a {self.task} model's is {expected}"
            )
        return str(chosen.name)

    def _probe(self) -> tuple[int, ...]:
        """The output shape of one row (the model's output width is only known for sure by running it)."""
        zeros = np.zeros((1, len(self.feature_names)), dtype=np.float32)
        try:
            out = np.asarray(self._run(self._outputs, {self._input: zeros})[0])
        except Exception as exc:
            raise ModelLoadError(f"ONNX model does not run on one row: {type(exc).__name__}: {exc}") from exc
        if out.size not in self._widths() or out.ndim not in (1, 2):
            raise ModelLoadError(
                f"ONNX output for one row has shape {list(out.shape)}; a {self.task} model answers "
                f"{' or '.join(map(str, self._widths()))} value(s)"
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

    def _answer(self, values: np.ndarray) -> Output:
        """The output of one instance's row of output values."""
        if self.task != "multiclass":
            return Output(float(values[-1]))
        probs = {c: float(p) for c, p in zip(self.classes, values, strict=True)}
        label = max(probs, key=probs.__getitem__)
        return Output(probs[label], label, probs)

    def predict_one(self, x: Mapping[str, Any]) -> Output:
        if not self._bind:
            return self.predict_many((x,))[0]
        bound = self._bound()
        bound.row[0] = feature_vector(x, self.feature_names)
        self.session.run_with_iobinding(bound.binding)
        return self._answer(bound.out)

    def predict_many(self, xs: Sequence[Mapping[str, Any]]) -> list[Output]:
        if not xs:
            return []
        out = self._run(self._outputs, {self._input: feature_matrix(xs, self.feature_names)})[0]
        return [self._answer(row) for row in np.asarray(out).reshape(len(xs), -1)]


def build_onnx(record: Mapping[str, Any], inputs: ModelInputs) -> ModelRuntime:
    """The runtime of an ``onnx`` record (artifact fetched); its task is the model's."""
    names = tuple(record.get("feature_names") or ())
    return OnnxRuntime(
        bytes(record["artifact"]),
        names,
        task=inputs.task,
        classes=record.get("classes") or (),
        strings=inputs.strings(names),
    )
