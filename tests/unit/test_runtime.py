"""Model runtimes: a contract every flavor meets for every task, then what is particular to ONNX and to
loading (definitions, URIs, signatures)."""

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
from river import compose, linear_model, preprocessing, tree

from infra.errors import ModelLoadError
from models import runtime
from models.artifacts import dump_river, load_river
from models.base import Output
from models.inputs import ModelInputs, model_inputs
from models.runtime import (
    CPU,
    CUDA,
    RUNTIME_BUILDERS,
    LoadPolicy,
    OnnxRuntime,
    feature_matrix,
    feature_vector,
    load_model,
    make_loader,
    onnx_providers,
)
from models.signing import Signer, Verifier
from schemas import codec
from schemas.definitions import Entity, Feature, FeatureView, Labels, Model, Project, Source

READINGS: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "test.runtime",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "x", "type": "double", "doc": "The measured value."},
        {"name": "flag", "type": "boolean"},
        {"name": "kind", "type": "string"},
        {"name": "ts", "type": "long"},
    ],
}
OUTCOMES: dict[str, Any] = {
    "type": "record",
    "name": "Outcome",
    "namespace": "test.runtime",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "faulty", "type": "boolean"},
        {"name": "minutes", "type": "double"},
        {"name": "grade", "type": "string"},
        {"name": "ts", "type": "long"},
    ],
}
TASKS = ("binary", "multiclass", "regression")
TARGETS = {"binary": "faulty", "regression": "minutes", "multiclass": "grade"}
CLASSES = ("a", "b", "c")
NUMERIC = ("x", "flag", "n_1h", "x_mean_1h")


def build_project() -> Project:
    readings = Source("readings", READINGS, key="sensor_id", event_time="ts")
    outcomes = Source("outcomes", OUTCOMES, key="reading_id", event_time="ts")
    sensor = Entity("sensor", "sensor_id")
    recent = FeatureView(
        "recent",
        readings,
        sensor,
        [Feature("n_1h", "count"), Feature("x_mean_1h", "mean", "x"), Feature("last_kind", "last", "kind")],
        window="1h",
    )
    models = []
    for task in TASKS:
        labels = Labels(f"{task}_labels", outcomes, "reading_id", TARGETS[task], task)  # type: ignore[arg-type]
        models.append(
            Model(
                name=task,
                task=task,  # type: ignore[arg-type]
                request=readings,
                request_fields=["x", "flag", "kind"],
                features=["recent.n_1h", "recent.x_mean_1h", "recent.last_kind"],
                labels=labels,
                learner="learners:new",
            )
        )
    return Project.of("runtime_test", [recent, *models])


PROJECT = build_project()
INPUTS: dict[str, ModelInputs] = model_inputs(PROJECT)
ROWS = [
    {"x": 12.5, "flag": True, "kind": "k1", "n_1h": 1, "x_mean_1h": 3.0, "last_kind": "k1"},
    {"x": 900.0, "flag": False, "kind": "k2", "n_1h": 7, "x_mean_1h": 30.0, "last_kind": None},
    {"x": 0.0, "flag": False, "kind": "", "n_1h": 0, "x_mean_1h": 0.0, "last_kind": ""},
]


# --- artifacts of each flavor ------------------------------------------------------------------------------


def river_learner(task: str) -> Any:
    head = {
        "binary": linear_model.LogisticRegression(),
        "regression": linear_model.LinearRegression(),
        "multiclass": tree.HoeffdingTreeClassifier(grace_period=5),
    }[task]
    learner = compose.Select(*NUMERIC) | preprocessing.StandardScaler() | head
    for i in range(60):
        x = {"x": 10.0 + i * 20, "flag": i % 2 == 0, "n_1h": i % 5, "x_mean_1h": float(i % 7), "kind": "k"}
        y = {"binary": i % 3 == 0, "regression": float(i) * 0.5, "multiclass": CLASSES[i % 3]}[task]
        learner.learn_one(x, y)
    return learner


def linear_onnx(
    n: int = len(NUMERIC),
    *,
    width: int = 1,
    activation: str | None = "Sigmoid",
    input_type: int = TensorProto.FLOAT,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """A hand-built ONNX linear model ``activation(x @ w + b)``, ``[batch, n]`` -> ``[batch, width]``;
    column j's weights are (j + 1) times the first's; of two columns, the first is the second negated."""
    w = np.stack([WEIGHTS * (j + 1) for j in range(width)], axis=1).astype(np.float32)
    if width == 2:  # class 0 then class 1, as classifier converters write them
        w[:, 0], w[:, 1] = -WEIGHTS, WEIGHTS
    out = "probability"
    nodes = [
        helper.make_node("Cast", ["features"], ["x"], to=TensorProto.FLOAT),  # a no-op for float input
        helper.make_node("MatMul", ["x", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z" if activation else out]),
    ]
    if activation == "Softmax":
        nodes.append(helper.make_node("Softmax", ["z"], [out], axis=1))
    elif activation:
        nodes.append(helper.make_node(activation, ["z"], [out]))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("features", input_type, ["batch", n])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", width])],
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, [n, width], w[:n].flatten().tolist()),
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


WEIGHTS = np.array([0.01, -1.5, 0.3, -0.002], dtype=np.float32)
BIAS = -0.5


def linear(x: dict[str, Any]) -> float:
    v = np.array(feature_vector(x, NUMERIC), dtype=np.float64)
    return float(v @ WEIGHTS.astype(np.float64) + BIAS)


def expected_onnx(task: str, x: dict[str, Any]) -> Output:
    z = linear(x)
    if task == "binary":
        return Output(1 / (1 + np.exp(-z)))
    if task == "regression":
        return Output(z)
    logits = np.array([(z - BIAS) * (j + 1) + BIAS for j in range(3)])
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    by_class = {c: float(p) for c, p in zip(CLASSES, probs, strict=True)}
    label = max(by_class, key=by_class.__getitem__)
    return Output(by_class[label], label, by_class)


def record(
    flavor: str, task: str, blob: bytes, feature_names: tuple[str, ...], /, **overrides: Any
) -> dict[str, Any]:
    base = {
        "model": task,
        "version": 7,
        "flavor": flavor,
        "task": task,
        "classes": list(CLASSES) if task == "multiclass" else [],
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
        "definitions_digest": PROJECT.digest(),
        "view_versions": {"recent": 1},
    }
    base.update(overrides)
    return base


def river_record(model: str = "binary", **overrides: Any) -> dict[str, Any]:
    """A record of the model named (and of the task of) ``model``."""
    blob, _ = dump_river(river_learner(model))
    return record("river", model, blob, INPUTS[model].names, **overrides)


def onnx_record(model: str = "binary", **overrides: Any) -> dict[str, Any]:
    activation = {"binary": "Sigmoid", "regression": None, "multiclass": "Softmax"}[model]
    blob = linear_onnx(width=3 if model == "multiclass" else 1, activation=activation)
    return record("onnx", model, blob, NUMERIC, **overrides)


RECORDS: dict[str, Callable[..., dict[str, Any]]] = {"river": river_record, "onnx": onnx_record}


def load(rec: dict[str, Any], policy: LoadPolicy | None = None) -> runtime.LoadedModel:
    return load_model(rec, INPUTS[rec["model"]], policy)


# --- the contract: every runtime, every task ---------------------------------------------------------------


def test_every_builder_has_a_contract_case() -> None:
    assert set(RECORDS) == set(RUNTIME_BUILDERS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_round_trips_its_artifact_and_answers_for_its_task(flavor: str, task: str) -> None:
    rec = RECORDS[flavor](task)
    # through the wire format too: encode as the current schema, decode, load
    loaded = load(codec.decode(codec.encode("model_version", rec), expected="model_version"))
    assert (loaded.name, loaded.version, loaded.flavor, loaded.task) == (task, 7, flavor, task)
    assert loaded.describe()["provider"] == loaded.runtime.provider
    assert loaded.definitions_digest == PROJECT.digest()
    assert loaded.view_versions == {"recent": 1} == loaded.describe()["view_versions"]
    one = [loaded.runtime.predict_one(x) for x in ROWS]
    assert all(isinstance(o, Output) and isinstance(o.score, float) for o in one)
    if task == "binary":
        assert all(0.0 <= o.score <= 1.0 and o.label is None and o.probabilities is None for o in one)
    elif task == "regression":
        assert all(o.label is None and o.probabilities is None for o in one)
        assert len({o.score for o in one}) == 3  # a value per input, not a probability
    else:
        for o in one:
            assert o.probabilities is not None and set(o.probabilities) == set(CLASSES)
            assert o.label in CLASSES and o.score == max(o.probabilities.values())
            assert sum(o.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    many = loaded.runtime.predict_many(ROWS)
    assert [o.score for o in many] == pytest.approx([o.score for o in one], abs=1e-6)
    assert [o.label for o in many] == [o.label for o in one]
    assert loaded.runtime.predict_many([]) == []


@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_a_corrupt_artifact_is_refused(flavor: str) -> None:
    good = RECORDS[flavor]()
    corrupt = bytes(good["artifact"][: len(good["artifact"]) // 2]) + b"\x00garbage"
    with pytest.raises(ModelLoadError, match=f"flavor '{flavor}'"):
        load(RECORDS[flavor](artifact=corrupt, sha256=hashlib.sha256(corrupt).hexdigest()))


@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_a_wrong_sha256_is_refused(flavor: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="digest"):
        load(RECORDS[flavor](sha256="0" * 64))
    good = RECORDS[flavor]()
    path = tmp_path / "artifact"
    path.write_bytes(good["artifact"])
    by_uri = {**good, "artifact": b"", "artifact_uri": path.as_uri()}
    assert load(by_uri).version == 7
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        load({**by_uri, "sha256": "f" * 64})


@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_a_record_that_does_not_fit_the_definition_is_refused(flavor: str) -> None:
    with pytest.raises(ModelLoadError, match="trained for a regression task; the model is defined as binary"):
        load(RECORDS[flavor]("binary", task="regression"))
    with pytest.raises(ModelLoadError, match=r"inputs \['colour'\] are not inputs of the model"):
        load(RECORDS[flavor](feature_names=["x", "colour"]))
    with pytest.raises(ModelLoadError, match="another model"):
        load_model(RECORDS[flavor]("binary"), INPUTS["regression"])
    loader = make_loader(INPUTS)
    assert loader(RECORDS[flavor]("multiclass")).task == "multiclass"
    with pytest.raises(ModelLoadError, match="not a model of the definitions"):
        loader({**RECORDS[flavor](), "model": "nope"})


def test_river_artifacts_check_their_digest_and_load() -> None:
    learner = river_learner("regression")
    blob, digest = dump_river(learner)
    assert digest == hashlib.sha256(blob).hexdigest()
    again = load_river(blob, digest.upper())
    assert again.predict_one(ROWS[0]) == pytest.approx(learner.predict_one(ROWS[0]))
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        load_river(blob, "0" * 64)
    junk = b"not a pickle"
    with pytest.raises(ModelLoadError, match="does not unpickle"):
        load_river(junk, hashlib.sha256(junk).hexdigest())


def test_river_needs_the_verb_of_its_task_and_answers_multiclass_before_learning() -> None:
    regressor = dump_river(compose.Select(*NUMERIC) | linear_model.LinearRegression())[0]
    with pytest.raises(ModelLoadError, match="has no attribute 'predict_proba_one'"):
        load(record("river", "binary", regressor, NUMERIC))
    fresh = dump_river(tree.HoeffdingTreeClassifier())[0]
    loaded = load(record("river", "multiclass", fresh, NUMERIC))  # has learnt nothing: every class at 0
    out = loaded.runtime.predict_one(ROWS[0])
    assert out.probabilities == dict.fromkeys(CLASSES, 0.0) and out.score == 0.0
    no_classes = load(record("river", "multiclass", fresh, NUMERIC, classes=[]))
    assert no_classes.runtime.predict_one(ROWS[0]) == Output(0.0, None, {})


# --- ONNX -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_onnx_answers_are_the_model_function_of_the_ordered_inputs(task: str) -> None:
    rt = OnnxRuntime(
        onnx_record(task)["artifact"], NUMERIC, task=task, classes=CLASSES if task == "multiclass" else ()
    )
    assert rt.provider == CPU
    for x in ROWS:
        want, got = expected_onnx(task, x), rt.predict_one(x)
        assert got.score == pytest.approx(want.score, abs=1e-5) and got.label == want.label
        if want.probabilities is not None:
            assert got.probabilities == pytest.approx(want.probabilities, abs=1e-5)
    # booleans are 0/1, None and missing are 0, doubles beyond float32 saturate (never inf)
    assert feature_vector({"a": True, "b": None, "c": False, "d": 3}, ["a", "b", "c", "d", "e"]) == [
        1.0,
        0.0,
        0.0,
        3.0,
        0.0,
    ]
    top = float(np.finfo(np.float32).max)
    assert feature_vector({"a": 1e300, "b": -1e300}, ["a", "b"]) == [top, -top]
    huge = {**ROWS[0], "x": -1.3e208}
    assert np.isfinite(feature_matrix([huge], NUMERIC)).all()
    assert rt.predict_one(huge).score == pytest.approx(rt.predict_many([huge])[0].score)


def test_onnx_two_column_output_scores_the_positive_class() -> None:
    rt = OnnxRuntime(linear_onnx(width=2), NUMERIC)
    for x in ROWS:
        want = 1 / (1 + np.exp(-linear(x)))
        assert rt.predict_one(x).score == pytest.approx(want, abs=1e-6)
        assert [o.score for o in rt.predict_many([x, x])] == pytest.approx([want] * 2, abs=1e-6)


def test_providers_prefer_cuda_when_onnxruntime_offers_it() -> None:
    assert onnx_providers([CUDA, CPU, "AzureExecutionProvider"]) == [CUDA, CPU]
    assert onnx_providers([CPU, "AzureExecutionProvider"]) == [CPU]
    assert onnx_providers()[-1] == CPU


@pytest.mark.parametrize(
    ("artifact", "names", "options", "message"),
    [
        (linear_onnx(), NUMERIC, {"strings": ["kind"]}, r"\['kind'\] are strings"),
        (linear_onnx(), NUMERIC[:3], {}, "takes 4 features; the record names 3"),
        (linear_onnx(input_type=TensorProto.DOUBLE), NUMERIC, {}, "expected tensor\\(float\\)"),
        (linear_onnx(width=3), NUMERIC, {}, r"a binary model's is \[batch\], \[batch, 1\] or \[batch, 2\]"),
        (linear_onnx(width=2), NUMERIC, {"task": "regression"}, "a regression model's is"),
        (linear_onnx(width=3), NUMERIC, {"task": "multiclass"}, "needs the record's classes"),
        (linear_onnx(width=3), NUMERIC, {"task": "multiclass", "classes": ["a", "b"]}, r"\[batch, 2\]"),
        (
            linear_onnx(metadata={runtime.ONNX_FEATURES_KEY: json.dumps(list(reversed(NUMERIC)))}),
            NUMERIC,
            {},
            "exported for inputs",
        ),
        (b"not onnx", NUMERIC, {}, "not a loadable ONNX model"),
    ],
)
def test_onnx_refuses_what_it_cannot_score_right(
    artifact: bytes, names: tuple[str, ...], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        OnnxRuntime(artifact, names, **options)


def test_onnx_records_naming_string_inputs_are_refused_at_load() -> None:
    with pytest.raises(ModelLoadError, match=r"\['kind', 'last_kind'\] are strings"):
        load(onnx_record(feature_names=["x", "kind", "last_kind", "n_1h"]))


def test_onnx_metadata_in_the_right_order_loads() -> None:
    meta = {runtime.ONNX_FEATURES_KEY: json.dumps(list(NUMERIC))}
    got = OnnxRuntime(linear_onnx(metadata=meta), NUMERIC).predict_one(ROWS[0])
    assert got.score == pytest.approx(expected_onnx("binary", ROWS[0]).score, abs=1e-6)


def test_onnx_predict_one_is_safe_across_threads() -> None:
    rt = OnnxRuntime(linear_onnx(), NUMERIC)
    rng = np.random.default_rng(3)
    xs = [
        {"x": float(a), "flag": bool(c), "n_1h": int(t)}
        for a, c, t in zip(
            rng.uniform(0, 1000, 400), rng.random(400) < 0.5, rng.integers(0, 9, 400), strict=True
        )
    ]
    expected = [expected_onnx("binary", x).score for x in xs]
    results: dict[int, list[float]] = {}

    def work(k: int) -> None:
        results[k] = [rt.predict_one(x).score for x in xs]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results.values():
        assert got == pytest.approx(expected, abs=1e-6)


# --- warm-up -----------------------------------------------------------------------------------------------


class _Answers:
    """A runtime double answering fixed outputs, to check what warm-up refuses."""

    provider = "python"

    def __init__(self, *outputs: Any) -> None:
        self.outputs = list(outputs)

    def predict_one(self, x: Any) -> Any:
        return self.outputs[0]

    def predict_many(self, xs: Any) -> Any:
        return self.outputs[1 : 1 + len(xs)] or [self.outputs[0]] * len(xs)


@pytest.mark.parametrize(
    ("task", "outputs", "message"),
    [
        ("binary", [Output(1.5)], "not a probability"),
        ("binary", [0.5], "is not an Output"),
        ("regression", [Output(float("nan"))], "not a finite number"),
        ("multiclass", [Output(0.5)], "needs class probabilities"),
        ("multiclass", [Output(0.7, "a", {"a": 0.7, "b": 1.3})], "not all probabilities"),
        ("multiclass", [Output(0.3, "b", {"a": 0.7, "b": 0.3})], "not the most probable"),
        ("multiclass", [Output(0.3, "c", {"a": 0.7, "b": 0.3})], "not a class of"),
        ("regression", [Output(1.0), Output(1.0), Output(2.0)], "disagree"),
    ],
)
def test_warm_up_refuses_answers_that_are_not_of_the_task(
    task: str, outputs: list[Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(RUNTIME_BUILDERS, "river", lambda rec, inputs: _Answers(*outputs))
    with pytest.raises(ModelLoadError, match=f"warm-up.*{message}"):
        load(river_record(task))


# --- loading: URIs and signatures -------------------------------------------------------------------------


def test_an_unsupported_uri_scheme_is_refused_by_name() -> None:
    with pytest.raises(ModelLoadError, match="URI 's3://models/4': unsupported scheme 's3'"):
        load(onnx_record(artifact=b"", artifact_uri="s3://models/4"))
    with pytest.raises(ModelLoadError, match="neither an inline artifact nor an artifact_uri"):
        load(onnx_record(artifact=b""))


def test_a_uri_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    rec = onnx_record()
    path = tmp_path / "model.onnx"
    path.write_bytes(rec["artifact"])
    policy = LoadPolicy(max_artifact_bytes=len(rec["artifact"]) - 1)
    with pytest.raises(ModelLoadError, match="over the limit"):
        load({**rec, "artifact": b"", "artifact_uri": path.as_uri()}, policy)


def signed(rec: dict[str, Any], signer: Signer) -> dict[str, Any]:
    signature, kid = signer.sign(rec)
    return {**rec, "signature": signature, "key_id": kid}


@pytest.mark.parametrize("flavor", sorted(RECORDS))
def test_with_trusted_keys_only_good_signatures_load(flavor: str) -> None:
    signer = Signer.from_key(Ed25519PrivateKey.generate())
    stranger = Signer.from_key(Ed25519PrivateKey.generate())
    policy = LoadPolicy(verifier=Verifier.from_public_keys(signer.private_key.public_key()))
    rec = RECORDS[flavor]()
    loaded = load(signed(rec, signer), policy)
    assert loaded.signed_by == signer.key_id and loaded.describe()["signed_by"] == signer.key_id
    with pytest.raises(ModelLoadError, match="unsigned"):
        load(rec, policy)
    with pytest.raises(ModelLoadError, match="not trusted"):
        load(signed(rec, stranger), policy)
    with pytest.raises(ModelLoadError, match="not bytes"):
        load({**signed(rec, signer), "signature": "c2lnbmF0dXJl"}, policy)
    # a signed artifact replayed as another version, or with its inputs reordered
    for change in ({"version": 8}, {"feature_names": list(reversed(rec["feature_names"]))}):
        with pytest.raises(ModelLoadError, match="bad signature"):
            load({**signed(rec, signer), **change}, policy)
    # ... or as another model of the same task
    other = signed(RECORDS[flavor]("regression"), signer)
    with pytest.raises(ModelLoadError, match="bad signature"):
        load_model({**other, "model": "binary", "task": "binary"}, INPUTS["binary"], policy)


def test_without_trusted_keys_unsigned_loads_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    runtime._unverified_warned.clear()
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        assert load(onnx_record()).signed_by is None
        assert load(onnx_record(version=8)).signed_by is None
    warnings = [r for r in caplog.records if "without signature checks" in r.getMessage()]
    assert len(warnings) == 1


def test_a_v1_record_still_decodes_and_loads_as_binary() -> None:
    import io

    import fastavro

    v1 = codec.schema("model_version", 1)
    fields = {f["name"] for f in v1["fields"]}
    rec = {k: v for k, v in onnx_record().items() if k in fields}
    buf = io.BytesIO()
    buf.write(codec.MAGIC + codec.schema_fingerprint(v1))
    fastavro.schemaless_writer(buf, v1, rec)
    decoded = codec.decode(buf.getvalue(), expected="model_version")
    assert decoded["signature"] is None and decoded["task"] == "binary" and decoded["classes"] == []
    loaded = load(decoded)
    assert (loaded.flavor, loaded.task, loaded.definitions_digest) == ("onnx", "binary", None)
    assert decoded["view_versions"] == {} and loaded.view_versions == {}  # no lineage: current views


def test_inputs_are_built_for_the_view_versions_a_lineage_names() -> None:
    newer = FeatureView(
        "recent",
        PROJECT.sources["readings"],
        PROJECT.entities["sensor"],
        [Feature("n_1h", "count"), Feature("x_mean_1h", "mean", "x"), Feature("last_kind", "last", "flag")],
        window="2h",
        version=2,
    )
    project = Project(
        PROJECT.name,
        PROJECT.sources,
        PROJECT.entities,
        {"recent": newer},
        PROJECT.labels,
        PROJECT.models,
        previous_views={"recent@1": PROJECT.views["recent"]},
    )
    model = project.models["binary"]
    current, old = ModelInputs.of(project, model), ModelInputs.of(project, model, {"recent": 1})
    assert (current.view_versions, old.view_versions) == ({"recent": 2}, {"recent": 1})
    assert current.views == (newer,) and old.views == (PROJECT.views["recent"],)
    assert (current.types["last_kind"], old.types["last_kind"]) == ("boolean", "string")  # each version's
    assert [p[0].ref for p in old.pairs({"sensor_id": "s1"})] == ["recent@1"]
