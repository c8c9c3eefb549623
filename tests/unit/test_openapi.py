"""The OpenAPI document: valid OpenAPI 3.1, covers every route of the app, and agrees with the validator."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema_rs
import orjson
import pytest
import schemathesis
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from starlette.routing import Route

from infra.errors import RequestError
from models.inputs import model_inputs
from schemas import codec
from schemas.definitions import Project
from serving.app import create_app
from serving.avro_json import avro_field_schema
from serving.deployments import ACTION_RULES, ACTIONS
from serving.openapi import SCORE_PATH, openapi_document
from serving.registry import ModelRegistry
from serving.settings import ServeSettings
from serving.validation import MAX_BATCH, RequestSchema

FEATURES = {"amount": 12.5, "category": "grocery", "country": "US", "card_present": True}
SCORE = "/v1/models/fraud/score"


@pytest.fixture(scope="module")
def schemas(fraud_project: Project) -> dict[str, RequestSchema]:
    return {name: RequestSchema(inputs) for name, inputs in model_inputs(fraud_project).items()}


@pytest.fixture(scope="module")
def document(schemas: dict[str, RequestSchema]) -> Any:
    def make(settings: ServeSettings | None = None, *, auth: bool = True) -> dict[str, Any]:
        return openapi_document(settings or ServeSettings(), auth_enabled=auth, models=schemas)

    return make


@pytest.mark.parametrize("auth", [True, False], ids=["keys", "no-keys"])
@pytest.mark.parametrize("metrics", ["public", "admin", "off"])
def test_document_is_valid_openapi_31(document: Any, auth: bool, metrics: str):
    doc = document(ServeSettings(serve_metrics_auth=metrics), auth=auth)  # type: ignore[arg-type]
    assert doc["openapi"] == "3.1.0"
    errors = [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(doc)]
    assert errors == []
    loaded = schemathesis.openapi.from_dict(copy.deepcopy(doc))
    loaded.validate()
    labels = {result.ok().label for result in loaded.get_all_operations()}
    assert f"POST {SCORE}" in labels and "GET /openapi.json" in labels
    assert ("GET /metrics" in labels) == (metrics != "off")


def test_the_meta_schema_check_can_fail(document: Any):
    doc = document()
    doc["paths"]["/healthz"]["get"]["responses"] = {"200": {"content": {}}}  # no description
    assert list(OPENAPI_31_VALIDATOR.iter_errors(doc)) != []


def test_every_route_of_the_app_is_documented(document: Any, fraud_project: Project):
    app = create_app(
        ServeSettings(), project=fraud_project, registry=ModelRegistry(), store=None, predlog=None
    )
    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"  # Starlette adds HEAD to every GET route
    }
    assert served, "the app has no routes?"
    doc = document()
    # the score route is documented once per model, with its own schemas
    scoring = {SCORE_PATH.replace("{name}", name) for name in fraud_project.models}
    assert {p for p in doc["paths"] if p.endswith("/score")} == scoring and SCORE in scoring
    documented = {
        (SCORE_PATH if path in scoring else path, method)
        for path, ops in doc["paths"].items()
        for method in ops
    }
    assert served - documented == set()
    assert {p for p, _ in documented} == {p for p, _ in served}


def test_security_follows_the_auth_rules(document: Any):
    doc = document()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <key>",
    }
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    score = doc["paths"][SCORE]["post"]
    assert score["security"] == [{"bearer": []}, {"apiKey": []}] and score["x-tide-role"] == "score"
    assert {"401", "403"} <= score["responses"].keys()
    assert "WWW-Authenticate" in score["responses"]["401"]["headers"]
    assert doc["paths"]["/v1/models"]["get"]["x-tide-role"] == "admin"
    assert doc["paths"]["/v1/models/{name}/deployments"]["post"]["x-tide-role"] == "admin"
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        op = doc["paths"][path]["get"]
        assert op["security"] == [] and "401" not in op["responses"], path
    admin_metrics = document(ServeSettings(serve_metrics_auth="admin"))["paths"]["/metrics"]["get"]
    assert admin_metrics["x-tide-role"] == "admin" and "403" in admin_metrics["responses"]

    open_doc = document(auth=False)
    assert "securitySchemes" not in open_doc["components"]
    for ops in open_doc["paths"].values():
        for op in ops.values():
            assert op["security"] == [] and "401" not in op["responses"] and "403" not in op["responses"]


def test_statuses_match_what_the_app_answers(document: Any):
    doc = document()
    score = doc["paths"][SCORE]["post"]["responses"]
    assert set(score) == {"200", "400", "401", "403", "404", "408", "413", "422", "503", "504"}
    assert "Retry-After" in score["503"]["headers"]
    deploy = doc["paths"]["/v1/models/{name}/deployments"]["post"]["responses"]
    assert set(deploy) == {"202", "400", "401", "403", "404", "408", "409", "413", "422", "503", "504"}
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503", "504"}
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    settings = ServeSettings(serve_max_body_bytes=1234, serve_body_timeout_s=3, serve_request_timeout_s=0.5)
    limited = document(settings)["paths"][SCORE]["post"]["responses"]
    assert "1234 bytes" in limited["413"]["description"]
    assert "3 s" in limited["408"]["description"] and "0.5 s" in limited["504"]["description"]


def test_model_names_and_deployment_body(document: Any, schemas: dict[str, RequestSchema]):
    doc = document()
    assert [p for p in doc["paths"][SCORE]["post"]["parameters"] if p["in"] == "path"] == []
    many = openapi_document(
        ServeSettings(),
        auth_enabled=False,
        actions=ACTIONS,
        models={"b": schemas["fraud"], "a": schemas["fraud"]},
    )
    [name] = [p for p in many["paths"]["/v1/models/{name}/deployments"]["post"]["parameters"]]
    assert name["schema"]["enum"] == ["a", "b"]
    assert {"/v1/models/a/score", "/v1/models/b/score"} <= many["paths"].keys()
    body = doc["components"]["schemas"]["DeploymentRequest"]
    shapes = {shape["properties"]["action"]["const"]: shape for shape in body["oneOf"]}
    assert list(shapes) == list(ACTIONS)
    deployment = {f["name"] for f in codec.schema("deployment")["fields"]}
    for action, (needs_version, takes_weight) in ACTION_RULES.items():
        shape = shapes[action]
        assert set(shape["properties"]) == deployment - {"model", "ts", "id", "source"}  # set by the service
        assert ("version" in shape["required"]) == (needs_version == "required")
        assert (shape["properties"]["weight"].get("maximum") == 1.0) == takes_weight
    assert set(
        doc["components"]["schemas"]["DeploymentAccepted"]["properties"]["deployment"]["properties"]
    ) == (deployment)


# --- the request body schema and the validator are one contract ------------------------------------------


def test_features_are_the_validators_request_fields(document: Any, fraud_project: Project):
    components = document()["components"]["schemas"]
    features = components["fraud.Features"]
    request_fields = list(fraud_project.models["fraud"].request_fields)
    assert list(features["properties"]) == request_fields and features["required"] == request_fields
    assert features["additionalProperties"] is False
    docs = {f["name"]: f.get("doc") for f in fraud_project.sources["transactions"].parsed["fields"]}
    for name, prop in features["properties"].items():
        assert prop["description"] == docs[name]
    assert components["fraud.Entities"]["required"] == ["card_id"]
    assert "entity" in components["fraud.Instance"]["properties"]  # one join key: the shorthand
    prediction = components["fraud.Prediction"]["properties"]
    assert set(prediction["feature_status"]["properties"]) == {"card_activity", "card_daily", "card_profile"}
    assert "label" not in prediction  # binary


def test_avro_field_schema():
    assert avro_field_schema({"name": "a", "type": "double"}) == {"type": "number"}
    assert avro_field_schema({"name": "a", "type": ["null", "string"], "doc": "d"}) == {
        "type": ["string", "null"],
        "description": "d",
    }
    assert avro_field_schema({"name": "a", "type": "int"})["maximum"] == 2**31 - 1
    with pytest.raises(TypeError):
        avro_field_schema({"name": "a", "type": {"type": "array", "items": "long"}})
    with pytest.raises(TypeError):
        avro_field_schema({"name": "a", "type": ["null", "int", "string"]})


def _instance(**changes: Any) -> dict[str, Any]:
    inst: dict[str, Any] = {"entity": "card-1", "event_id": "ev-1", "features": dict(FEATURES)}
    if changes.pop("by_entities", False):
        del inst["entity"]
        inst["entities"] = {"card_id": "card-1"}
    for key, value in changes.items():
        if key.startswith("f_"):
            if value is _DROP:
                inst["features"].pop(key[2:])
            else:
                inst["features"][key[2:]] = value
        elif value is _DROP:
            inst.pop(key)
        else:
            inst[key] = value
    return inst


_DROP = object()

BODIES = {
    "one": _instance(),
    "one, integer amount": _instance(f_amount=7),
    "one, event_id null": _instance(event_id=None),
    "one, no event_id": _instance(event_id=_DROP),
    "batch of 1": {"instances": [_instance()]},
    f"batch of {MAX_BATCH}": {"instances": [_instance()] * MAX_BATCH},
    "empty batch": {"instances": []},
    f"batch of {MAX_BATCH + 1}": {"instances": [_instance()] * (MAX_BATCH + 1)},
    "batch with an extra key": {"instances": [_instance()], "x": 1},
    "batch holding a bad instance": {"instances": [_instance(), _instance(f_amount="1")]},
    "instances not an array": {"instances": {}},
    "array body": [_instance()],
    "missing feature": _instance(f_country=_DROP),
    "unknown feature": _instance(f_colour="red"),
    "unknown top-level field": _instance(extra=1),
    "empty entity": _instance(entity=""),
    "entity not a string": _instance(entity=5),
    "event_id not a string": _instance(event_id=5),
    "features not an object": _instance(features=[]),
    "amount as string": _instance(f_amount="12.5"),
    "amount boolean": _instance(f_amount=True),
    "amount null": _instance(f_amount=None),
    "card_present as number": _instance(f_card_present=1),
    "category as number": _instance(f_category=3),
    "no features": _instance(features=_DROP),
    "no entity": _instance(entity=_DROP),
    "by entities": _instance(by_entities=True),
    "both entity and entities": {**_instance(), "entities": {"card_id": "card-1"}},
    "entities missing a key": {**_instance(entity=_DROP), "entities": {}},
    "entities with an unknown key": {**_instance(entity=_DROP), "entities": {"card_id": "c", "x": "y"}},
    "entities with an empty value": {**_instance(entity=_DROP), "entities": {"card_id": ""}},
    "entities null": {**_instance(entity=_DROP), "entities": None},
    "entities not an object": {**_instance(entity=_DROP), "entities": ["card-1"]},
}


@pytest.mark.parametrize("case", list(BODIES))
def test_request_schema_accepts_exactly_what_the_validator_accepts(
    document: Any, schemas: dict[str, RequestSchema], case: str
):
    doc = document()
    validator = jsonschema_rs.validator_for(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": doc["components"],
            **doc["paths"][SCORE]["post"]["requestBody"]["content"]["application/json"]["schema"],
        }
    )
    body = BODIES[case]
    try:
        schemas["fraud"].parse_body(orjson.dumps(body))
        accepted = True
    except RequestError as exc:
        accepted = False
        assert exc.status == 422  # well-formed JSON that breaks the schema (400 is for broken JSON)
    assert validator.is_valid(body) == accepted, case
