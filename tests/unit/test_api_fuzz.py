"""schemathesis against the app's own /openapi.json: generated valid and invalid requests to every
operation, with API keys on, never get a 5xx, and every response matches the document."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from features import tiles
from schemas.definitions import FeatureView
from features.store import FeatureRow
from examples.fraud.model import FEATURE_NAMES, dump, new_model
from schemas import codec
from serving.app import create_app
from serving.auth import new_key
from serving.registry import ModelRegistry
from models.runtime import load_model
from serving.settings import ServeSettings

KEY, ENTRY = new_key("fuzz", ["score", "admin"])


class MissingFeatures:
    """Every entity is new: scoring runs on the views' defaults."""

    async def read(self, view: FeatureView, entities: Sequence[str]) -> list[FeatureRow]:
        empty = tiles.window_values(view, {}, 0)
        return [FeatureRow(e, view.name, empty, "missing", None, None, view.describe()) for e in entities]

    async def ping(self) -> bool:
        return True


class EncodingLog:
    """Encodes every prediction record as the real log does, so a record that cannot be logged fails."""

    def log(self, record: Mapping[str, Any]) -> None:
        codec.encode("prediction", record)


def _app() -> Any:
    blob, digest = dump(new_model())
    registry = ModelRegistry(known=["fraud"])
    record = {
        "model": "fraud",
        "version": 1,
        "flavor": "river",
        "artifact": blob,
        "sha256": digest,
        "feature_names": list(FEATURE_NAMES),
        "created_ts": int(time.time() * 1000),
    }
    registry.swap(load_model(record))

    async def deployer(deployment: dict[str, Any]) -> None:
        codec.encode("deployment", deployment)  # what publishing does first
        registry.deploy(deployment)

    serve = ServeSettings(serve_api_keys=[ENTRY])
    return create_app(
        serve, registry=registry, store=MissingFeatures(), predlog=EncodingLog(), deployer=deployer
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
