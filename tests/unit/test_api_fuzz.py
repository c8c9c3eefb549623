"""schemathesis against the app's own /openapi.json: generated valid and invalid requests to every
operation, with API keys on, never get a 5xx, and every response matches the document."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from onnx import TensorProto, helper
from schemathesis.config import SchemathesisConfig

from features import tiles
from features.store import FeatureRow
from infra.imports import import_object
from models.artifacts import dump_river
from models.inputs import ModelInputs, model_inputs
from models.runtime import load_model
from schemas import codec
from schemas.definitions import FeatureView
from serving.app import create_app
from serving.auth import new_key
from serving.registry import ModelRegistry
from serving.settings import ServeSettings
from tide.project import load_project

KEY, ENTRY = new_key("fuzz", ["score", "admin"])
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fraud"


class MissingFeatures:
    """Every entity is new: scoring runs on the views' defaults."""

    async def read_pairs(self, pairs: Sequence[tuple[FeatureView, str]]) -> list[FeatureRow]:
        return [
            FeatureRow(e, v.name, tiles.window_values(v, {}, 0), "missing", None, None, v.describe())
            for v, e in pairs
        ]

    async def ping(self) -> bool:
        return True


class EncodingLog:
    """Encodes every prediction record as the real log does, so a record that cannot be logged fails."""

    def log(self, record: Mapping[str, Any]) -> None:
        codec.encode("prediction", record)


def _linear_onnx(n: int) -> bytes:
    """sigmoid(x @ w + b) over ``n`` float inputs: a stand-in for a batch-trained binary model."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["probability"]),
        ],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, [n, 1], [0.01] * n),
            helper.make_tensor("b", TensorProto.FLOAT, [1], [-0.5]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto.SerializeToString()


def _record(inputs: ModelInputs) -> dict[str, Any]:
    """A version of any binary model of the example: its own learner when it has one (river, the project's
    code), else ONNX over its numeric inputs, as a batch trainer publishes it."""
    if inputs.model.learner:
        flavor, names = "river", list(inputs.names)
        blob, _ = dump_river(import_object(inputs.model.learner)())
    else:
        flavor, names = "onnx", [n for n in inputs.names if n not in inputs.strings([n])]
        blob = _linear_onnx(len(names))
    return {
        "model": inputs.name,
        "version": 1,
        "flavor": flavor,
        "task": inputs.task,
        "artifact": blob,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "feature_names": names,
        "created_ts": int(time.time() * 1000),
    }


def _app() -> Any:
    project = load_project(EXAMPLE)  # at collection: the schema is built from the app's own document
    registry = ModelRegistry()
    for inputs in model_inputs(project).values():  # a version of every model: every path can score
        registry.swap(load_model(_record(inputs), inputs))

    async def deployer(deployment: dict[str, Any]) -> None:
        codec.encode("deployment", deployment)  # what publishing does first
        registry.deploy(deployment)

    serve = ServeSettings(serve_api_keys=[ENTRY])
    return create_app(
        serve,
        project=project,
        registry=registry,
        store=MissingFeatures(),
        predlog=EncodingLog(),
        deployer=deployer,
    )


# A schema-valid batch can still be too large for the body limit (413), a valid rollback can have nothing to
# roll back to (409); invalid data may also meet the
# time limits (408) or the size limit before its content is judged.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2XX", 401, 403, 404, 409, 413]},
            "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 408, 413, 422]},
        }
    }
)
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(), config=CONFIG)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"})
