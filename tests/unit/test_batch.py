"""Batch retraining pieces without a broker: the MLP, its ONNX export and the parity check, the split."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from infra.errors import ModelLoadError, TrainingError
from online_training.batch import (
    NUMERIC_FEATURES,
    LogMLP,
    check_parity,
    export_onnx,
    pick_device,
    split_by_time,
    torch_scores,
    train_mlp,
)
from online_training.trainer import rolling_auc
from models.runtime import ONNX_FEATURES_KEY, OnnxRuntime, feature_matrix, load_model


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows shaped like training rows: fraud is large relative to the card's mean, card not present."""
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
                "txn_count_1h": float(rng.integers(0, 6)),
                "amount_sum_1h": mean * 3,
                "amount_mean_1h": mean,
                "amount_max_1h": mean * 1.8,
                "amount_std_1h": None if i % 7 == 0 else mean / 3,
                "merchants_1h": float(rng.integers(0, 4)),
            }
        )
    return rows


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, list[dict[str, Any]], list[dict[str, Any]]]:
    rows = synthetic_rows(3000)
    train, held_out = split_by_time(rows, 0.25)
    X = feature_matrix(train, NUMERIC_FEATURES)
    y = np.array([r["is_fraud"] for r in train], dtype=np.float32)
    return train_mlp(X, y, epochs=8, device="cpu"), train, held_out


def test_numeric_features_are_what_serving_assembles() -> None:
    from schemas.definitions import CARD_ACTIVITY
    from models.inputs import REQUEST_FIELD_TYPES

    assert set(NUMERIC_FEATURES) <= set(REQUEST_FIELD_TYPES) | set(CARD_ACTIVITY.feature_names)
    assert all(REQUEST_FIELD_TYPES.get(f, "double") != "string" for f in NUMERIC_FEATURES)


def test_the_mlp_learns_and_returns_a_cpu_eval_module(trained: Any) -> None:
    module, _, held_out = trained
    assert isinstance(module, LogMLP) and not module.training
    assert all(p.device.type == "cpu" for p in module.parameters())
    scores = torch_scores(module, feature_matrix(held_out, NUMERIC_FEATURES))
    assert ((scores >= 0) & (scores <= 1)).all()
    auc = rolling_auc([r["is_fraud"] for r in held_out], scores.tolist())
    assert auc is not None and auc > 0.9  # the synthetic classes are well separated


def test_export_scores_like_torch_through_the_serving_runtime(trained: Any) -> None:
    module, _, held_out = trained
    artifact = export_onnx(module, NUMERIC_FEATURES)
    proto = onnx.load_from_string(artifact)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[ONNX_FEATURES_KEY]) == list(NUMERIC_FEATURES)
    assert [i.name for i in proto.graph.input] == ["features"]
    assert [o.name for o in proto.graph.output] == ["probability"]
    # standardisation is folded into the first Gemm: no Sub/Div before it
    assert not {"Sub", "Div"} & {n.op_type for n in proto.graph.node}
    runtime = OnnxRuntime(artifact, NUMERIC_FEATURES)
    assert check_parity(runtime, module, held_out) <= 1e-5
    expected = torch_scores(module, feature_matrix(held_out, NUMERIC_FEATURES))
    assert np.abs(np.asarray(runtime.predict_many(held_out)) - expected).max() <= 1e-5


def test_the_parity_check_catches_a_different_model(trained: Any) -> None:
    module, _, held_out = trained
    other = LogMLP(len(NUMERIC_FEATURES), 32).eval()
    runtime = OnnxRuntime(export_onnx(other, NUMERIC_FEATURES), NUMERIC_FEATURES)
    with pytest.raises(TrainingError, match="differ from torch"):
        check_parity(runtime, module, held_out)


def test_an_exported_model_loads_as_an_onnx_version(trained: Any) -> None:
    import hashlib

    module, _, held_out = trained
    artifact = export_onnx(module, NUMERIC_FEATURES)
    record = {
        "model": "fraud-nn",
        "version": 1,
        "flavor": "onnx",
        "artifact": artifact,
        "artifact_uri": None,
        "sha256": hashlib.sha256(artifact).hexdigest(),
        "feature_names": list(NUMERIC_FEATURES),
        "created_ts": 0,
    }
    loaded = load_model(record)
    assert loaded.runtime.predict_one(held_out[0]) == pytest.approx(
        float(torch_scores(module, feature_matrix(held_out[:1], NUMERIC_FEATURES))[0]), abs=1e-5
    )
    with pytest.raises(ModelLoadError, match="exported for inputs"):  # the artifact knows its input order
        load_model({**record, "feature_names": list(reversed(NUMERIC_FEATURES))})


def test_training_is_deterministic_for_a_seed() -> None:
    rows = synthetic_rows(600, seed=1)
    X = feature_matrix(rows, NUMERIC_FEATURES)
    y = np.array([r["is_fraud"] for r in rows], dtype=np.float32)
    a, b = (torch_scores(train_mlp(X, y, epochs=2, seed=5), X) for _ in range(2))
    c = torch_scores(train_mlp(X, y, epochs=2, seed=6), X)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_inputs_and_devices() -> None:
    with pytest.raises(TrainingError, match="shape"):
        train_mlp(np.zeros((3, 2), np.float32), np.zeros(2))
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("auto") == pick_device(None)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no GPU"):
            pick_device("cuda")


def test_split_holds_out_the_newest_rows() -> None:
    rows = [{"event_ts": t} for t in (5, 1, 4, 2, 3, 9, 8, 7, 6, 0)]
    train, held_out = split_by_time(rows, 0.2)
    assert [r["event_ts"] for r in train] == list(range(8))
    assert [r["event_ts"] for r in held_out] == [8, 9]
    assert len(split_by_time(rows[:3], 0.1)[1]) == 1  # at least one row is held out
