"""Batch retraining (``tide retrain``): a PyTorch MLP on point-in-time features, published as ONNX.

One cycle (:func:`retrain`):

1. replay the events and labels topics and build one row per label: the labelled event's request fields
   plus its card's ``card_activity`` window as of just before the event
   (:func:`features.training.point_in_time`, the window code the online processor runs), i.e. what
   serving saw when it scored the event;
2. split by event time: the newest ``retrain_holdout`` share is held out;
3. train a small MLP (:func:`train_mlp`) on CUDA when torch sees a GPU, else on CPU;
4. export it to ONNX (:func:`export_onnx`) and score the held-out rows through
   :class:`models.runtime.OnnxRuntime`, the exact serving path; refuse to publish unless those scores
   equal torch's to within 1e-5;
5. publish it as the next version of ``retrain_model_name`` (flavor ``onnx``) with its held-out ROC AUC,
   unless the AUC is under ``retrain_min_auc`` or no label arrived since the last version.

The model takes :data:`NUMERIC_FEATURES` raw, as serving assembles them; its graph carries its own
preprocessing (``log1p`` of the non-negative inputs, standardisation folded into the first layer), so
serving needs no second copy of it. Categorical request fields are not inputs (see models.runtime).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from schemas.definitions import CARD_ACTIVITY
from features.training import point_in_time
from infra.errors import TrainingError
from infra.settings import CommonSettings
from examples.fraud.model import PROFILED, REQUEST_FIELDS
from models.profile import build_profile
from online_training.publish import latest_record, publish_model_version, signer_of
from online_training.settings import RetrainSettings
from online_training.trainer import rolling_auc
from schemas import codec
from models.runtime import ONNX_FEATURES_KEY, ONNX_OUTPUT_NAME, OnnxRuntime, feature_matrix
from infra.kafka import read_to_end
from infra.topics import TOPICS, topic

log = logging.getLogger(__name__)

# Numeric request fields (booleans count: 0/1) and every card_activity feature: what serving assembles.
NUMERIC_FEATURES: tuple[str, ...] = ("amount", "card_present", *CARD_ACTIVITY.feature_names)
FLAVOR = "onnx"
ONNX_INPUT_NAME = "features"
ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-5


class LogMLP(nn.Module):
    """``sigmoid(mlp(log1p(max(x, 0))))``: raw non-negative inputs in, a probability ``[batch, 1]`` out."""

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    @staticmethod
    def transform(x: torch.Tensor) -> torch.Tensor:
        # Amounts and counts are heavy-tailed and non-negative: logs make ratios (amount / mean) linear.
        return torch.log1p(torch.relu(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.transform(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested``, or CUDA when torch sees a GPU, else CPU (``"auto"`` is the same as None)."""
    if requested is not None and str(requested) != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("device cuda was asked for, but torch sees no GPU")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
) -> nn.Module:
    """Train a :class:`LogMLP` on ``X`` (float32 ``[n, features]``) and ``y`` (0/1 labels).

    Returns the model on the CPU in eval mode, standardisation folded into its first layer, so its
    forward pass is the whole scoring function.
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise TrainingError(f"training data of shape {X.shape} with {len(y)} labels")
    dev = pick_device(device)
    log.info(
        "training on %s%s: %d rows, %d features, %d epochs",
        dev,
        f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "",
        len(X),
        X.shape[1],
        epochs,
    )
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # Batches of a 32-wide MLP are microseconds of work: intra-op threads only add hand-offs (measured
        # 30x slower with 2 threads than 1 on a busy 2-core machine).
        torch.set_num_threads(1)
    try:
        model, mean, std = _fit(
            X, y, dev, epochs=epochs, hidden=hidden, seed=seed, batch_size=batch_size, lr=lr
        )
    finally:
        torch.set_num_threads(threads)
    model = model.cpu().eval()
    with torch.no_grad():  # fold (z - mean) / std into the first layer: one Gemm instead of three ops
        first = model.net[0]
        assert isinstance(first, nn.Linear)
        weight = first.weight / std
        first.bias.sub_(weight @ mean)
        first.weight.copy_(weight)
    return model


def _fit(
    X: np.ndarray,
    y: np.ndarray,
    dev: torch.device,
    *,
    epochs: int,
    hidden: int,
    seed: int,
    batch_size: int,
    lr: float,
) -> tuple[LogMLP, torch.Tensor, torch.Tensor]:
    """Mini-batch Adam on standardised inputs; returns the model and the standardisation it learnt on."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LogMLP(X.shape[1], hidden)
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    z = LogMLP.transform(xt)
    mean, std = z.mean(0), z.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant input stays as it is
    zt = ((z - mean) / std).to(dev)
    yt = yt.to(dev)
    net = model.net.to(dev)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(zt), generator=generator).to(dev)
        for start in range(0, len(zt), batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(net(zt[idx]).squeeze(1), yt[idx])
            loss.backward()
            optimiser.step()
    return model, mean, std


def export_onnx(module: nn.Module, feature_names: Sequence[str]) -> bytes:
    """ONNX bytes of ``module`` (float32 ``[batch, len(feature_names)]`` in, probabilities out).

    The graph's input is ``features``, its output ``probability``, the batch dimension dynamic, and the
    input order is recorded in the model's metadata (``tide.feature_names``), which serving checks.
    """
    names = list(feature_names)
    module = copy.deepcopy(module).cpu().eval()
    try:
        with tempfile.TemporaryDirectory(prefix="tide-onnx-") as tmp, warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript
            # (not a dependency). The parity check in retrain() guards what it produces.
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
    """``module``'s probabilities for ``X`` on the CPU, as float64 ``[n]``."""
    with torch.no_grad():
        out = module.cpu().eval()(torch.from_numpy(np.asarray(X, dtype=np.float32)))
    return np.asarray(out.numpy(), dtype=np.float64).reshape(len(X), -1)[:, -1]


def check_parity(runtime: OnnxRuntime, module: nn.Module, rows: Sequence[Mapping[str, Any]]) -> float:
    """Max |onnxruntime - torch| over ``rows`` scored the way serving scores them (batch and one by one);
    TrainingError when it is over 1e-5."""
    expected = torch_scores(module, feature_matrix(rows, runtime.feature_names))
    batch = np.asarray(runtime.predict_many(rows))
    single = np.asarray([runtime.predict_one(x) for x in rows[:100]])  # the per-request path too
    diff = max(
        float(np.abs(batch - expected).max(initial=0.0)),
        float(np.abs(single - expected[: len(single)]).max(initial=0.0)),
    )
    if not diff <= PARITY_TOLERANCE:
        raise TrainingError(f"onnxruntime scores differ from torch by {diff:.3g} (> {PARITY_TOLERANCE})")
    return diff


@dataclass(frozen=True)
class Candidate:
    """A trained model, its ONNX artifact and how they did on the held-out rows."""

    module: nn.Module
    artifact: bytes
    scores: list[float]  # onnxruntime's, per held-out row
    roc_auc: float | None
    max_abs_diff: float  # onnxruntime vs torch on the held-out rows
    device: str


def fit(
    settings: RetrainSettings, train: Sequence[Mapping[str, Any]], held_out: Sequence[Mapping[str, Any]]
) -> Candidate:
    """Train on ``train``, export, check ONNX against torch and evaluate on ``held_out`` (no publishing)."""
    device = pick_device(settings.retrain_device)
    module = train_mlp(
        feature_matrix(train, NUMERIC_FEATURES),
        np.array([bool(r["is_fraud"]) for r in train], dtype=np.float32),
        epochs=settings.retrain_epochs,
        device=device,
        hidden=settings.retrain_hidden,
        seed=settings.retrain_seed,
    )
    artifact = export_onnx(module, NUMERIC_FEATURES)
    runtime = OnnxRuntime(artifact, NUMERIC_FEATURES)
    diff = check_parity(runtime, module, held_out)
    scores = runtime.predict_many(held_out)
    auc = rolling_auc([bool(r["is_fraud"]) for r in held_out], scores)
    return Candidate(module, artifact, scores, auc, diff, device.type)


# --- the training set -----------------------------------------------------------------------------------


def _decoded(settings: CommonSettings, name: str) -> dict[int, list[dict[str, Any]]]:
    spec = TOPICS[name]
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for msg in read_to_end(settings, topic(settings, name), spec.partitions):
        try:
            record = codec.decode(msg.value() or b"", spec.record)
        except Exception as exc:  # the online processor dead-letters these; here they are skipped
            log.warning("skipping undecodable %s record at offset %s: %s", name, msg.offset(), exc)
            continue
        by_partition.setdefault(msg.partition() or 0, []).append(record)
    return by_partition


def training_rows(settings: CommonSettings) -> list[dict[str, Any]]:
    """One row per label whose event is on the events topic, in event-time order (module docstring)."""
    events = _decoded(settings, "events")
    labels = [label for part in _decoded(settings, "labels").values() for label in part]
    by_id = {e["event_id"]: e for part in events.values() for e in part}
    known = [label for label in labels if label["event_id"] in by_id]
    if len(known) < len(labels):
        missing = len(labels) - len(known)
        log.info("%d of %d labels have no event on the events topic; left out", missing, len(labels))
    rows = point_in_time([CARD_ACTIVITY], events, known)
    for row in rows:
        event = by_id[row["event_id"]]
        row.update({field: event[field] for field in REQUEST_FIELDS})
    # Partitions interleave differently on every read: a total order makes the same topics give the
    # same training set, split and model (events of one millisecond tie on time alone).
    return sorted(rows, key=_time_order)


def _time_order(row: Mapping[str, Any]) -> tuple[int, str]:
    return int(row["event_ts"]), str(row.get("event_id", ""))


def split_by_time(
    rows: Sequence[dict[str, Any]], holdout: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)``: the newest ``holdout`` share of ``rows`` (by event time) is held out."""
    ordered = sorted(rows, key=_time_order)
    cut = len(ordered) - max(1, int(len(ordered) * holdout))
    return ordered[:cut], ordered[cut:]


# --- one cycle, and the periodic loop -------------------------------------------------------------------


def retrain(settings: RetrainSettings) -> dict[str, Any]:
    """One retraining cycle (module docstring); returns a summary, ``published`` saying whether it did."""
    started = time.perf_counter()
    name = settings.retrain_model_name
    rows = training_rows(settings)
    summary: dict[str, Any] = {"model": name, "labels": len(rows), "published": False}
    if len(rows) < settings.retrain_min_labels:
        return {**summary, "reason": f"{len(rows)} labels, fewer than {settings.retrain_min_labels}"}
    latest = latest_record(settings, name)
    train, held_out = split_by_time(rows, settings.retrain_holdout)
    if latest is not None and latest["trained_on"] == len(train):
        return {**summary, "version": latest["version"], "reason": "no new labels since the last version"}
    if len({bool(r["is_fraud"]) for r in train}) < 2 or len({bool(r["is_fraud"]) for r in held_out}) < 2:
        return {**summary, "reason": "the training or held-out split has only one class"}
    candidate = fit(settings, train, held_out)
    auc, scores = candidate.roc_auc, candidate.scores
    summary.update(
        train=len(train),
        held_out=len(held_out),
        roc_auc=auc,
        device=candidate.device,
        max_abs_diff=candidate.max_abs_diff,
        artifact_bytes=len(candidate.artifact),
    )
    if auc is None or auc < settings.retrain_min_auc:
        return {**summary, "reason": f"held-out ROC AUC {auc} is under {settings.retrain_min_auc}"}
    version = (latest["version"] if latest else 0) + 1
    record = publish_model_version(
        settings,
        model=name,
        version=version,
        flavor=FLAVOR,
        artifact=candidate.artifact,
        feature_names=NUMERIC_FEATURES,
        metric_name="roc_auc_held_out",
        metric_value=auc,
        trained_on=len(train),
        reference=build_profile(held_out, scores, PROFILED),
    )
    return {
        **summary,
        "published": True,
        "version": version,
        "artifact_uri": record["artifact_uri"],
        "signed_by": record["key_id"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def run(
    settings: RetrainSettings,
    *,
    every_s: float | None = None,
    stop: threading.Event | None = None,
    on_result: Callable[[dict[str, Any]], None] = lambda _: None,
) -> None:
    """Retrain once, or every ``every_s`` seconds until ``stop`` is set (a failed cycle is logged, then the
    next one runs; a single run raises)."""
    stop = stop or threading.Event()
    signer_of(settings)  # a bad signing key fails now
    while not stop.is_set():
        try:
            result = retrain(settings)
        except Exception:
            if every_s is None:
                raise
            # The next cycle may well succeed (a broker back from a restart): log, wait, go on.
            log.exception("retraining %s failed; next try in %.0f s", settings.retrain_model_name, every_s)
        else:
            log.info("retrain %s", json.dumps(result, default=str))
            on_result(result)
        if every_s is None or stop.wait(every_s):
            return
