"""Batch retraining pieces without a broker: training per task, the ONNX export and its parity check, the
input check and the time split."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from examples.fraud.fraud_network import LogMLP, new_network
from features.training import Example
from infra.errors import ModelLoadError, TrainingError
from models.inputs import ModelInputs
from models.runtime import ONNX_FEATURES_KEY, OnnxRuntime, feature_matrix, load_model
from online_training.batch import batch_models, check_model, split_by_time
from online_training.evaluation import rolling_auc
from online_training.network import (
    MLP,
    Scored,
    check_parity,
    export_onnx,
    fit_network,
    pick_device,
    torch_scores,
)
from schemas.definitions import Project

NAMES = (
    "amount",
    "card_present",
    "txn_count_1h",
    "amount_sum_1h",
    "amount_mean_1h",
    "amount_max_1h",
    "amount_std_1h",
    "merchants_1h",
)


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows shaped like the fraud_nn model's inputs: fraud is large relative to the card's mean."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        fraud = bool(rng.random() < 0.1)
        mean = float(rng.lognormal(3.4, 0.6))
        amount = mean * (rng.uniform(3, 12) if fraud else rng.lognormal(0, 0.5))
        rows.append(
            {
                "event_ts": i,
                "is_fraud": fraud,
                "amount": round(amount, 2),
                "card_present": bool(rng.random() < (0.15 if fraud else 0.75)),
                "txn_count_1h": int(rng.integers(0, 6)),
                "amount_sum_1h": mean * 3,
                "amount_mean_1h": mean,
                "amount_max_1h": mean * 1.8,
                "amount_std_1h": None if i % 7 == 0 else mean / 3,
                "merchants_1h": float(rng.integers(0, 4)),
            }
        )
    return rows


def matrix(rows: list[dict[str, Any]]) -> np.ndarray:
    return feature_matrix(rows, NAMES)


@pytest.fixture(scope="module")
def trained() -> tuple[Scored, list[dict[str, Any]], list[dict[str, Any]]]:
    rows = synthetic_rows(3000)
    train, held_out = rows[:2250], rows[2250:]
    y = np.array([r["is_fraud"] for r in train], dtype=np.float32)
    torch.manual_seed(0)
    module = fit_network(new_network(len(NAMES)), matrix(train), y, "binary", epochs=8, device="cpu")
    return module, train, held_out


def test_the_fraud_network_learns_and_returns_a_cpu_eval_module(trained: Any) -> None:
    module, _, held_out = trained
    assert isinstance(module, Scored) and isinstance(module.module, LogMLP) and not module.training
    assert all(p.device.type == "cpu" for p in module.parameters())
    scores = torch_scores(module, matrix(held_out))
    assert ((scores >= 0) & (scores <= 1)).all()
    auc = rolling_auc([r["is_fraud"] for r in held_out], scores.tolist())
    assert auc is not None and auc > 0.9  # the synthetic classes are well separated
    # prepare() fixed the standardisation from the training rows, in buffers the export carries
    assert module.module.std.ne(1.0).any() and module.module.mean.ne(0.0).any()


def test_export_scores_like_torch_through_the_serving_runtime(trained: Any) -> None:
    module, _, held_out = trained
    artifact = export_onnx(module, NAMES)
    proto = onnx.load_from_string(artifact)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[ONNX_FEATURES_KEY]) == list(NAMES)
    assert [i.name for i in proto.graph.input] == ["features"]
    assert [o.name for o in proto.graph.output] == ["probability"]
    runtime = OnnxRuntime(artifact, NAMES)
    assert check_parity(runtime, module, held_out) <= 1e-5
    expected = torch_scores(module, matrix(held_out))
    assert np.abs(np.asarray([o.score for o in runtime.predict_many(held_out)]) - expected).max() <= 1e-5


def test_the_parity_check_catches_a_different_model(trained: Any) -> None:
    module, _, held_out = trained
    other = Scored(LogMLP(len(NAMES)), "binary").eval()
    runtime = OnnxRuntime(export_onnx(other, NAMES), NAMES)
    with pytest.raises(TrainingError, match="differ from torch"):
        check_parity(runtime, module, held_out)


def test_regression_learns_the_target_scale_and_exports_values() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(2000, 3)).astype(np.float32)
    y = (200 + 40 * X[:, 0] - 15 * X[:, 1] + rng.normal(scale=2, size=2000)).astype(np.float32)
    torch.manual_seed(0)
    module = fit_network(MLP(3), X[:1600], y[:1600], "regression", epochs=20, device="cpu")
    pred = torch_scores(module, X[1600:])
    mae, baseline = np.abs(pred - y[1600:]).mean(), np.abs(y[1600:].mean() - y[1600:]).mean()
    assert mae < 0.2 * baseline  # far better than the mean: the output head maps back to the scale
    names = ("a", "b", "c")
    runtime = OnnxRuntime(export_onnx(module, names), names, task="regression")
    rows = [dict(zip(names, map(float, r), strict=True)) for r in X[1600:]]
    assert check_parity(runtime, module, rows) <= 1e-5  # relative: values are around 200


def test_an_exported_model_loads_as_a_version_of_fraud_nn(trained: Any, fraud_project: Project) -> None:
    module, _, held_out = trained
    model = fraud_project.models["fraud_nn"]
    assert model.input_names == NAMES
    artifact = export_onnx(module, NAMES)
    record = {
        "model": "fraud_nn",
        "version": 1,
        "flavor": "onnx",
        "task": "binary",
        "artifact": artifact,
        "artifact_uri": None,
        "sha256": hashlib.sha256(artifact).hexdigest(),
        "feature_names": list(NAMES),
        "created_ts": 0,
    }
    inputs = ModelInputs.of(fraud_project, model)
    loaded = load_model(record, inputs)
    assert loaded.runtime.predict_one(held_out[0]).score == pytest.approx(
        float(torch_scores(module, matrix(held_out[:1]))[0]), abs=1e-5
    )
    with pytest.raises(ModelLoadError, match="exported for inputs"):  # the artifact knows its input order
        load_model({**record, "feature_names": list(reversed(NAMES))}, inputs)


def test_training_is_deterministic_for_a_seed() -> None:
    rows = synthetic_rows(600, seed=1)
    X, y = matrix(rows), np.array([r["is_fraud"] for r in rows], dtype=np.float32)

    def train(seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        return torch_scores(fit_network(new_network(len(NAMES)), X, y, "binary", epochs=2, seed=seed), X)

    a, b, c = train(5), train(5), train(6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_inputs_tasks_and_devices() -> None:
    with pytest.raises(TrainingError, match="shape"):
        fit_network(MLP(2), np.zeros((3, 2), np.float32), np.zeros(2), "binary")
    with pytest.raises(TrainingError, match="binary and regression"):
        fit_network(MLP(2), np.zeros((3, 2), np.float32), np.zeros(3), "multiclass")
    with pytest.raises(TrainingError, match="values per row"):
        fit_network(torch.nn.Linear(2, 2), np.zeros((3, 2), np.float32), np.zeros(3), "binary", epochs=1)
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("auto") == pick_device(None)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no GPU"):
            pick_device("cuda")


def test_only_numeric_models_are_batch_trained(fraud_project: Project) -> None:
    assert [m.name for m in batch_models(fraud_project)] == ["fraud_nn"]
    check_model(fraud_project, fraud_project.models["fraud_nn"])
    fraud = fraud_project.models["fraud"]  # its request fields include category: a string
    with pytest.raises(TrainingError, match="model 'fraud', input 'category': string inputs"):
        check_model(fraud_project, fraud)


def test_split_holds_out_the_newest_examples() -> None:
    examples = [Example(f"k{t}", {}, True, t) for t in (5, 1, 4, 2, 3, 9, 8, 7, 6, 0)]
    train, held_out = split_by_time(examples, 0.2)
    assert [e.ts for e in train] == list(range(8))
    assert [e.ts for e in held_out] == [8, 9]
    assert len(split_by_time(examples[:3], 0.1)[1]) == 1  # at least one example is held out
