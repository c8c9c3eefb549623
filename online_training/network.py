"""Training a torch module for a task, exporting it to ONNX, and checking the export scores like torch.

The contract of a batch trainer (a model's ``batch_trainer``, ``"module:factory"``): ``factory(n_inputs)``
returns a ``torch.nn.Module`` that maps a float32 ``[batch, n_inputs]`` of the model's inputs, raw, as
serving assembles them (``None`` -> 0, booleans 0/1; see :mod:`models.onnx_runtime`), to one value per
row (``[batch, 1]`` or ``[batch]``): the logit of ``True`` (binary) or the value (regression). The
module owns its preprocessing; if it has a ``prepare(x)`` method, it is called once with the training
inputs before training (e.g. to fix standardisation statistics in buffers).

:func:`fit_network` trains it with mini-batch Adam (binary: binary cross-entropy on the logit;
regression: mean squared error on the standardised target) and returns :class:`Scored`: the module with
its output head (the sigmoid, or the target's scale and mean), the function serving answers with.
:func:`export_onnx` writes that as ONNX (input ``features``, output ``probability``, batch dynamic, the
input order in the metadata); :func:`check_parity` scores rows through serving's runtime and refuses an
export that differs from torch.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from infra.errors import TrainingError
from models.runtime import ONNX_FEATURES_KEY, ONNX_OUTPUT_NAME, OnnxRuntime, feature_matrix

log = logging.getLogger(__name__)

ONNX_INPUT_NAME = "features"
ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-5  # absolute up to 1, relative beyond (float32 values of any scale)
TASKS = ("binary", "regression")


class Scored(nn.Module):
    """A trained module with its output head: ``[batch, 1]`` probabilities of ``True`` (binary) or values
    (regression: the module learnt the standardised target, mapped back here)."""

    def __init__(self, module: nn.Module, task: str, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.module = module
        self.task = task
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.module(x).reshape(-1, 1)
        if self.task == "binary":
            return torch.sigmoid(z)
        return z * self.scale + self.shift


class MLP(nn.Module):
    """A plain network for any numeric inputs: standardised (statistics from :meth:`prepare`), two ReLU
    layers, one output."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_inputs: int, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_inputs))
        self.register_buffer("std", torch.ones(n_inputs))
        self.net = nn.Sequential(
            nn.Linear(n_inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def prepare(self, x: torch.Tensor) -> None:
        std = x.std(0)
        self.mean.copy_(x.mean(0))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested``, or CUDA when torch sees a GPU, else CPU (``"auto"`` is the same as None)."""
    if requested is not None and str(requested) != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("device cuda was asked for, but torch sees no GPU")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_network(
    module: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    task: str,
    *,
    epochs: int = 30,
    device: str | torch.device | None = None,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 3e-3,
) -> Scored:
    """Train ``module`` on ``X`` (float32 ``[n, inputs]``) for ``y`` (0/1 or values); returns it with its
    output head (:class:`Scored`), on the CPU in eval mode."""
    if task not in TASKS:
        raise TrainingError(f"batch training supports {' and '.join(TASKS)} tasks, not {task}")
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise TrainingError(f"training data of shape {X.shape} with {len(y)} targets")
    dev = pick_device(device)
    log.info(
        "training on %s%s: %d rows, %d inputs, %d epochs",
        dev,
        f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "",
        len(X),
        X.shape[1],
        epochs,
    )
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # Batches of a small MLP are microseconds of work: intra-op threads only add hand-offs (measured
        # 30x slower with 2 threads than 1 on a busy 2-core machine).
        torch.set_num_threads(1)
    try:
        xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        prepare = getattr(module, "prepare", None)
        if callable(prepare):
            with torch.no_grad():
                prepare(xt)
        scale, shift = 1.0, 0.0
        if task == "regression":
            shift, scale = float(yt.mean()), float(yt.std()) if len(yt) > 1 else 1.0
            scale = scale if scale > 1e-9 else 1.0
            yt = (yt - shift) / scale
        _fit(module, xt, yt, task, dev, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr)
    finally:
        torch.set_num_threads(threads)
    return Scored(module.cpu(), task, scale, shift).eval()


def _fit(
    module: nn.Module,
    xt: torch.Tensor,
    yt: torch.Tensor,
    task: str,
    dev: torch.device,
    *,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = xt.to(dev), yt.to(dev)
    module.to(dev).train()
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if task == "binary" else nn.MSELoss()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator).to(dev)
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad()
            out = module(xt[idx])
            if out.numel() != len(idx):
                raise TrainingError(
                    f"the module returns {out.numel() // max(len(idx), 1)} values per row; "
                    f"a {task} model returns 1"
                )
            loss = loss_fn(out.reshape(-1), yt[idx])
            loss.backward()
            optimiser.step()


def train_mlp(
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 30,
    device: str | torch.device | None = None,
    hidden: int = 32,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 3e-3,
) -> Scored:
    """A plain :class:`MLP` trained for a binary task (for benchmarks and tests that need an ONNX model)."""
    torch.manual_seed(seed)
    module = MLP(np.asarray(X).shape[1], hidden)
    return fit_network(
        module, X, y, "binary", epochs=epochs, device=device, seed=seed, batch_size=batch_size, lr=lr
    )


def export_onnx(module: nn.Module, feature_names: Sequence[str]) -> bytes:
    """ONNX bytes of ``module`` (float32 ``[batch, len(feature_names)]`` in, ``[batch, 1]`` out).

    The graph's input is ``features``, its output ``probability``, the batch dimension dynamic, and the
    input order is recorded in the model's metadata (``tide.feature_names``), which serving checks.
    """
    names = list(feature_names)
    module = copy.deepcopy(module).cpu().eval()
    try:
        with tempfile.TemporaryDirectory(prefix="tide-onnx-") as tmp, warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript
            # (not a dependency). check_parity guards what it produces.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (torch.zeros(1, len(names)),),
                Path(tmp) / "model.onnx",
                dynamo=False,
                input_names=[ONNX_INPUT_NAME],
                output_names=[ONNX_OUTPUT_NAME],
                dynamic_axes={ONNX_INPUT_NAME: {0: "batch"}, ONNX_OUTPUT_NAME: {0: "batch"}},
                opset_version=ONNX_OPSET,
            )
            proto = onnx.load(Path(tmp) / "model.onnx")
        proto.producer_name = "tide"
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_FEATURES_KEY, json.dumps(names)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise TrainingError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return proto.SerializeToString()


def torch_scores(module: nn.Module, X: np.ndarray) -> np.ndarray:
    """``module``'s outputs for ``X`` on the CPU, as float64 ``[n]``."""
    with torch.no_grad():
        out = module.cpu().eval()(torch.from_numpy(np.asarray(X, dtype=np.float32)))
    return np.asarray(out.numpy(), dtype=np.float64).reshape(len(X), -1)[:, -1]


def check_parity(runtime: OnnxRuntime, module: nn.Module, rows: Sequence[Mapping[str, Any]]) -> float:
    """Max difference between onnxruntime and torch over ``rows`` scored the way serving scores them
    (batch and one by one), relative beyond 1; :class:`TrainingError` when it is over 1e-5."""
    expected = torch_scores(module, feature_matrix(rows, runtime.feature_names))
    batch = np.asarray([o.score for o in runtime.predict_many(rows)])
    single = np.asarray([runtime.predict_one(x).score for x in rows[:100]])  # the per-request path too
    scale = np.maximum(1.0, np.abs(expected))
    diff = max(
        float((np.abs(batch - expected) / scale).max(initial=0.0)),
        float((np.abs(single - expected[: len(single)]) / scale[: len(single)]).max(initial=0.0)),
    )
    if not diff <= PARITY_TOLERANCE:
        raise TrainingError(f"onnxruntime scores differ from torch by {diff:.3g} (> {PARITY_TOLERANCE})")
    return diff
