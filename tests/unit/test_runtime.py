"""Model runtimes: a contract every flavor meets, then what is particular to ONNX and to loading."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from infra.errors import ModelLoadError
from models.signing import Signer, Verifier
from examples.fraud import model as river_model
from schemas import codec
from models import runtime
from models.runtime import (
    CPU,
    CUDA,
    RUNTIME_BUILDERS,
    LoadPolicy,
    OnnxRuntime,
    feature_vector,
    load_model,
    make_loader,
    onnx_providers,
)
from serving.settings import ServeSettings

NUMERIC = ("amount", "card_present", "txn_count_1h", "amount_mean_1h")
WEIGHTS = np.array([0.01, -1.5, 0.3, -0.002], dtype=np.float32)
BIAS = -0.5


def logistic_onnx(
    n: int = len(NUMERIC),
    *,
    weights: np.ndarray = WEIGHTS,
    width: int = 1,
    input_type: int = TensorProto.FLOAT,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """A hand-built ONNX logistic regression: sigmoid(x @ w + b), ``[batch, n]`` -> ``[batch, width]``."""
    w = np.repeat(weights.reshape(n, 1), width, axis=1).astype(np.float32)
    if width == 2:
        w[:, 0] = -w[:, 0]  # class 0 then class 1, as classifier converters write them
    nodes = [
        helper.make_node("Cast", ["features"], ["x"], to=TensorProto.FLOAT),  # a no-op for float input
        helper.make_node("MatMul", ["x", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes,
        "logistic",
        [helper.make_tensor_value_info("features", input_type, ["batch", n])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", width])],
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, [n, width], w.flatten().tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, [width], [BIAS] * width),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def expected_logistic(x: dict[str, Any]) -> float:
    v = np.array(feature_vector(x, NUMERIC), dtype=np.float64)
    return float(1 / (1 + np.exp(-(v @ WEIGHTS.astype(np.float64) + BIAS))))


def record(flavor: str, blob: bytes, feature_names: tuple[str, ...], **overrides: Any) -> dict[str, Any]:
    base = {
        "model": "fraud",
        "version": 7,
        "flavor": flavor,
        "artifact": blob,
        "artifact_uri": None,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "feature_names": list(feature_names),
        "metric_name": "",
        "metric_value": None,
        "trained_on": 0,
        "reference": None,
        "created_ts": int(time.time() * 1000),
        "signature": None,
        "key_id": None,
    }
    base.update(overrides)
    return base


def river_record(**overrides: Any) -> dict[str, Any]:
    learner = river_model.new_model()
    for i in range(40):
        x = {"amount": 10.0 + i * 20, "category": "grocery", "country": "US", "card_present": i % 2 == 0}
        learner.learn_one(x, i % 3 == 0)
    blob, _ = river_model.dump(learner)
    return record("river", blob, river_model.FEATURE_NAMES, **overrides)


def onnx_record(**overrides: Any) -> dict[str, Any]:
    return record("onnx", logistic_onnx(), NUMERIC, **overrides)


RECORDS: dict[str, Callable[..., dict[str, Any]]] = {"river": river_record, "onnx": onnx_record}
INPUTS = [
    {"amount": 12.5, "category": "grocery", "country": "US", "card_present": True, "txn_count_1h": 1.0},
    {"amount": 900.0, "category": "jewelry", "country": "NG", "card_present": False, "amount_mean_1h": 30.0},
    {"amount": 0.0, "category": "", "country": "", "card_present": False, "txn_count_1h": None},
]


# --- the contract: every runtime --------------------------------------------------------------------------


def test_every_builder_has_a_contract_case() -> None:
    assert set(RECORDS) == set(RUNTIME_BUILDERS)


@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_round_trips_its_artifact_and_scores_probabilities(flavor: str) -> None:
    rec = RECORDS[flavor]()
    # through the wire format too: encode as the current schema, decode, load
    loaded = load_model(codec.decode(codec.encode("model_version", rec), expected="model_version"))
    assert (loaded.name, loaded.version, loaded.flavor) == ("fraud", 7, flavor)
    assert loaded.describe()["provider"] == loaded.runtime.provider
    one = [loaded.runtime.predict_one(x) for x in INPUTS]
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in one)
    assert loaded.runtime.predict_many(INPUTS) == pytest.approx(one, abs=1e-6)
    assert loaded.runtime.predict_many([]) == []


@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_a_corrupt_artifact_is_refused(flavor: str) -> None:
    good = RECORDS[flavor]()
    corrupt = bytes(good["artifact"][: len(good["artifact"]) // 2]) + b"\x00garbage"
    with pytest.raises(ModelLoadError, match=f"flavor '{flavor}'"):
        load_model(RECORDS[flavor](artifact=corrupt, sha256=hashlib.sha256(corrupt).hexdigest()))


@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_a_wrong_sha256_is_refused(flavor: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="digest"):
        load_model(RECORDS[flavor](sha256="0" * 64))
    good = RECORDS[flavor]()
    path = tmp_path / "artifact"
    path.write_bytes(good["artifact"])
    by_uri = {**good, "artifact": b"", "artifact_uri": path.as_uri()}
    assert load_model(by_uri).version == 7
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        load_model({**by_uri, "sha256": "f" * 64})


# --- ONNX -------------------------------------------------------------------------------------------------


def test_onnx_scores_are_the_model_function_of_the_ordered_features() -> None:
    rt = OnnxRuntime(logistic_onnx(), NUMERIC)
    assert rt.provider == CPU
    for x in INPUTS:
        assert rt.predict_one(x) == pytest.approx(expected_logistic(x), abs=1e-6)
    # booleans are 0/1, None and missing are 0
    assert feature_vector({"a": True, "b": None, "c": False, "d": 3}, ["a", "b", "c", "d", "e"]) == [
        1.0,
        0.0,
        0.0,
        3.0,
        0.0,
    ]


def test_onnx_two_column_output_scores_the_positive_class() -> None:
    rt = OnnxRuntime(logistic_onnx(width=2), NUMERIC)
    for x in INPUTS:
        assert rt.predict_one(x) == pytest.approx(expected_logistic(x), abs=1e-6)
        assert rt.predict_many([x, x]) == pytest.approx([expected_logistic(x)] * 2, abs=1e-6)


def test_providers_prefer_cuda_when_onnxruntime_offers_it() -> None:
    assert onnx_providers([CUDA, CPU, "AzureExecutionProvider"]) == [CUDA, CPU]
    assert onnx_providers([CPU, "AzureExecutionProvider"]) == [CPU]
    assert onnx_providers()[-1] == CPU


@pytest.mark.parametrize(
    ("artifact", "names", "message"),
    [
        (
            logistic_onnx(),
            ("amount", "country", "card_present", "txn_count_1h"),
            r"\['country'\] are strings",
        ),
        (logistic_onnx(), NUMERIC[:3], "takes 4 features; the record names 3"),
        (logistic_onnx(input_type=TensorProto.DOUBLE), NUMERIC, "expected tensor\\(float\\)"),
        (logistic_onnx(width=3), NUMERIC, "expected \\[batch\\], \\[batch, 1\\] or \\[batch, 2\\]"),
        (
            logistic_onnx(metadata={runtime.ONNX_FEATURES_KEY: json.dumps(list(reversed(NUMERIC)))}),
            NUMERIC,
            "exported for inputs",
        ),
        (b"not onnx", NUMERIC, "not a loadable ONNX model"),
    ],
)
def test_onnx_refuses_what_it_cannot_score_right(
    artifact: bytes, names: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        OnnxRuntime(artifact, names)


def test_onnx_metadata_in_the_right_order_loads() -> None:
    meta = {runtime.ONNX_FEATURES_KEY: json.dumps(list(NUMERIC))}
    assert OnnxRuntime(logistic_onnx(metadata=meta), NUMERIC).predict_one(INPUTS[0]) == pytest.approx(
        expected_logistic(INPUTS[0]), abs=1e-6
    )


def test_onnx_predict_one_is_safe_across_threads() -> None:
    rt = OnnxRuntime(logistic_onnx(), NUMERIC)
    rng = np.random.default_rng(3)
    xs = [
        {"amount": float(a), "card_present": bool(c), "txn_count_1h": float(t)}
        for a, c, t in zip(
            rng.uniform(0, 1000, 400), rng.random(400) < 0.5, rng.integers(0, 9, 400), strict=True
        )
    ]
    expected = [expected_logistic(x) for x in xs]
    results: dict[int, list[float]] = {}

    def work(k: int) -> None:
        results[k] = [rt.predict_one(x) for x in xs]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results.values():
        assert got == pytest.approx(expected, abs=1e-6)


# --- loading: URIs and signatures -------------------------------------------------------------------------


def test_an_unsupported_uri_scheme_is_refused_by_name() -> None:
    with pytest.raises(ModelLoadError, match="URI 's3://models/4': unsupported scheme 's3'"):
        load_model(onnx_record(artifact=b"", artifact_uri="s3://models/4"))
    with pytest.raises(ModelLoadError, match="neither an inline artifact nor an artifact_uri"):
        load_model(onnx_record(artifact=b""))


def test_a_uri_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    rec = onnx_record()
    path = tmp_path / "model.onnx"
    path.write_bytes(rec["artifact"])
    policy = LoadPolicy(max_artifact_bytes=len(rec["artifact"]) - 1)
    with pytest.raises(ModelLoadError, match="over the limit"):
        load_model({**rec, "artifact": b"", "artifact_uri": path.as_uri()}, policy)


def signed(rec: dict[str, Any], signer: Signer) -> dict[str, Any]:
    signature, kid = signer.sign(rec)
    return {**rec, "signature": signature, "key_id": kid}


@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_with_trusted_keys_only_good_signatures_load(flavor: str) -> None:
    signer = Signer.from_key(Ed25519PrivateKey.generate())
    stranger = Signer.from_key(Ed25519PrivateKey.generate())
    policy = LoadPolicy(verifier=Verifier.from_public_keys(signer.private_key.public_key()))
    rec = RECORDS[flavor]()
    loaded = load_model(signed(rec, signer), policy)
    assert loaded.signed_by == signer.key_id and loaded.describe()["signed_by"] == signer.key_id
    with pytest.raises(ModelLoadError, match="unsigned"):
        load_model(rec, policy)
    with pytest.raises(ModelLoadError, match="not trusted"):
        load_model(signed(rec, stranger), policy)
    with pytest.raises(ModelLoadError, match="not bytes"):
        load_model({**signed(rec, signer), "signature": "c2lnbmF0dXJl"}, policy)
    # a signed artifact replayed as another version or model, or with its inputs reordered
    for change in (
        {"version": 8},
        {"model": "fraud-nn"},
        {"feature_names": list(reversed(rec["feature_names"]))},
    ):
        with pytest.raises(ModelLoadError, match="bad signature"):
            load_model({**signed(rec, signer), **change}, policy)


def test_without_trusted_keys_unsigned_loads_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    runtime._unverified_warned.clear()
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        assert load_model(onnx_record()).signed_by is None
        assert load_model(onnx_record(version=8)).signed_by is None
    warnings = [r for r in caplog.records if "without signature checks" in r.getMessage()]
    assert len(warnings) == 1


def test_make_loader_reads_the_trusted_keys_of_the_settings(tmp_path: Path) -> None:
    from infra.errors import ConfigError
    from models.signing import generate_key_pair

    keys = generate_key_pair(tmp_path / "keys")
    signer = Signer.from_pem_file(Path(keys["private_key"]))
    loader = make_loader(ServeSettings(serve_trusted_keys_file=keys["public_key"]))
    assert loader(signed(onnx_record(), signer)).signed_by == keys["key_id"]
    with pytest.raises(ModelLoadError, match="unsigned"):
        loader(onnx_record())
    assert make_loader(ServeSettings())(onnx_record()).signed_by is None
    with pytest.raises(ConfigError, match="trusted keys"):
        make_loader(ServeSettings(serve_trusted_keys_file=str(tmp_path / "missing.pem")))


def test_a_v1_record_still_decodes_and_loads() -> None:
    import io

    import fastavro

    v1 = codec.schema("model_version", 1)
    rec = {k: v for k, v in onnx_record().items() if k not in ("signature", "key_id")}
    buf = io.BytesIO()
    buf.write(codec.MAGIC + codec.schema_fingerprint(v1))
    fastavro.schemaless_writer(buf, v1, rec)
    decoded = codec.decode(buf.getvalue(), expected="model_version")
    assert decoded["signature"] is None and decoded["key_id"] is None
    assert load_model(decoded).flavor == "onnx"
