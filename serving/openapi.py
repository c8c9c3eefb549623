"""The scoring service's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Nothing here is a second copy of a field list: each model's request body is built from the
:class:`serving.validation.RequestSchema` the validator checks it with (request fields typed and
described by the model's request source schema, the entities by the join keys of its views), its
response by its task; the deployment body and record follow the Avro ``deployment`` schema and
:data:`serving.deployments.ACTIONS`, and the statuses are those the app and its middlewares answer with.
Which routes need which key role follows :func:`serving.auth.default_rules`, so the document and the
middleware agree on what is public.

Every model has its own scoring path (``/v1/models/<name>/score``) with its own request and response
schemas (components ``<name>.Instance``, ``<name>.Batch``, ``<name>.Prediction``, ...); other names
answer 404.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from features.store import Status
from schemas import codec
from serving import openapi_admin
from serving.auth import PUBLIC, ROLES, AccessRules, default_rules
from serving.avro_json import AVRO_TO_JSON
from serving.deployments import ACTIONS, ARM_CANARY, ARM_CHAMPION
from serving.settings import ServeSettings
from serving.validation import INTEGER_KEYS, RequestSchema

OPENAPI_VERSION = "3.1.0"
ARMS_RETURNED = (ARM_CHAMPION, ARM_CANARY)  # a shadow's answer is logged, never returned
SCORE_PATH = "/v1/models/{name}/score"  # the route; documented once per model with the name filled in

_SCORE_DOC = {
    "binary": "The probability of the positive class.",
    "regression": "The predicted value.",
    "multiclass": "The probability of the predicted class (`label`).",
}

_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
_KEYED: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]  # either header


def _record_fields(record: str) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in codec.schema(record)["fields"]}


def features_schema(schema: RequestSchema) -> dict[str, Any]:
    """The ``features`` object of an instance: every request field, typed as validation types it."""
    properties = {}
    for f in schema.fields:
        prop = copy.deepcopy(AVRO_TO_JSON[f.type])
        if f.nullable:
            prop["type"] = [prop["type"], "null"]
        if f.doc:
            prop["description"] = f.doc
        properties[f.name] = prop
    return {
        "type": "object",
        "description": f"The request fields of a {schema.inputs.model.request.name} record; the online "
        "features are added by the service.",
        "properties": properties,
        "required": [f.name for f in schema.fields],
        "additionalProperties": False,
    }


def _entity_value_schema(schema: RequestSchema, key: str) -> dict[str, Any]:
    entity = next(v.entity for v in schema.inputs.views if v.entity_key == key)
    about = entity.description or f"The {entity.name} entity."
    views = ", ".join(v.name for v in schema.inputs.views if v.entity_key == key)
    description = f"{about} Its features are read from: {views}."
    if schema.join_key_types.get(key) in INTEGER_KEYS:
        return {"type": ["integer", "string"], "pattern": "^-?[0-9]+$", "description": description}
    return {"type": "string", "minLength": 1, "description": description}


def entities_schema(schema: RequestSchema) -> dict[str, Any]:
    """The ``entities`` object of an instance: a value per join key of the model's views."""
    return {
        "type": "object",
        "description": "The entities whose online features are read, by join key.",
        "properties": {key: _entity_value_schema(schema, key) for key in schema.join_keys},
        "required": list(schema.join_keys),
        "additionalProperties": False,
    }


def _model_components(name: str, schema: RequestSchema) -> dict[str, Any]:
    """The request and response schemas of one model (see the module docstring)."""
    task = schema.inputs.task
    instance_props: dict[str, Any] = {
        "entities": _ref(f"{name}.Entities"),
        "event_id": {
            "type": ["string", "null"],
            "description": _record_fields("prediction")["event_id"].get("doc", ""),
        },
        "features": _ref(f"{name}.Features"),
    }
    instance: dict[str, Any] = {"type": "object", "properties": instance_props, "required": ["features"]}
    if schema.shorthand:
        key = schema.join_keys[0]
        instance_props["entity"] = {
            **_entity_value_schema(schema, key),
            "description": f"Shorthand for entities: {{{key!r}: value}}.",
        }
        instance["oneOf"] = [{"required": ["entity"]}, {"required": ["entities"]}]
    elif schema.join_keys:
        instance["required"] = ["entities", "features"]
    instance["additionalProperties"] = False
    views = [v.name for v in schema.inputs.views]
    prediction_props: dict[str, Any] = {
        "request_id": {"type": "string"},
        "model": {"const": name},
        "version": {"type": "integer", "description": "The model version that answered."},
        "arm": {"type": "string", "enum": list(ARMS_RETURNED)},
        "score": {"type": "number", "description": _SCORE_DOC[task]},
        "entities": {
            "type": "object",
            "description": "The entities whose online features were read, by join key.",
            "additionalProperties": {"type": "string"},
        },
        "features": {
            "type": "object",
            "description": "The exact input scored: request fields and online features (counts as integers).",
        },
        "feature_status": {
            "type": "object",
            "description": "Per view read: whether the entity's features were present, missing or expired.",
            "properties": {v: {"type": "string", "enum": list(typing.get_args(Status))} for v in views},
            "additionalProperties": False,
        },
        "feature_age_ms": {
            "type": "object",
            "description": "Per view read: age of the entity's newest event in the store (null: none).",
            "properties": {v: {"type": ["integer", "null"]} for v in views},
            "additionalProperties": False,
        },
    }
    required = ["request_id", "model", "version", "arm", "score"]
    if task == "multiclass":
        prediction_props["label"] = {
            "type": ["string", "null"],
            "description": "The predicted class (null when the model knows no class yet).",
        }
        prediction_props["probabilities"] = {
            "type": "object",
            "description": "Every class's probability, by class.",
            "additionalProperties": {"type": "number"},
        }
        required += ["label", "probabilities"]
    return {
        f"{name}.Features": features_schema(schema),
        f"{name}.Entities": entities_schema(schema),
        f"{name}.Instance": instance,
        f"{name}.Batch": {
            "type": "object",
            "properties": {
                "instances": {
                    "type": "array",
                    "items": _ref(f"{name}.Instance"),
                    "minItems": 1,
                    "maxItems": schema.max_batch,
                }
            },
            "required": ["instances"],
            "additionalProperties": False,
        },
        f"{name}.Prediction": {"type": "object", "properties": prediction_props, "required": required},
        f"{name}.BatchPrediction": {
            "type": "object",
            "properties": {
                "request_id": {"type": "string"},
                "predictions": {"type": "array", "items": _ref(f"{name}.Prediction")},
            },
            "required": ["request_id", "predictions"],
        },
    }


def _components(models: Mapping[str, RequestSchema], actions: Sequence[str]) -> dict[str, Any]:
    per_model: dict[str, Any] = {}
    for name in sorted(models):
        per_model.update(_model_components(name, models[name]))
    error = {
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "What is wrong."},
            "field": {
                "type": "string",
                "description": "The offending field: features.x, entities.y, instances[3].features.x...",
            },
        },
        "required": ["error"],
    }
    return {
        "Error": error,
        **per_model,
        **openapi_admin.components(actions, error),
        "Health": {
            "type": "object",
            "properties": {"status": {"const": "ok"}},
            "required": ["status"],
        },
        "Ready": {
            "type": "object",
            "properties": {"status": {"const": "ready"}, "models": _ref("ModelVersions")},
            "required": ["status", "models"],
        },
        "NotReady": {
            "type": "object",
            "properties": {
                "status": {"const": "not ready"},
                "reasons": {"type": "array", "items": {"type": "string"}},
                "models": _ref("ModelVersions"),
            },
            "required": ["status", "reasons"],
        },
        "ModelVersions": {
            "type": "object",
            "description": "The champion version each model serves (null: none loaded).",
            "additionalProperties": {"type": ["integer", "null"]},
        },
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json(_ref("Error"), description, headers)


_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="tide"'}}


def openapi_document(
    settings: ServeSettings,
    *,
    auth_enabled: bool,
    models: Mapping[str, RequestSchema],
    actions: Sequence[str] = ACTIONS,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the app built from ``settings``, serving ``models``.

    ``auth_enabled``: whether API keys are configured (keyed operations then declare their security and
    401/403; without keys nothing is enforced, and the document says so). ``models``: each model's
    request schema, by name; other names answer 404. ``actions``: the deployment actions (default
    :data:`serving.deployments.ACTIONS`).
    """
    limits = (settings.serve_max_body_bytes, settings.serve_body_timeout_s, settings.serve_request_timeout_s)
    max_body, body_timeout, request_timeout = limits
    access = AccessRules(default_rules(settings.serve_metrics_auth))
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "Model name.",
        "schema": {"type": "string", "enum": sorted(models)},
    }

    def operation(
        method: str, path: str, op_id: str, summary: str, responses: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        needs = access.access_for(method.upper(), path)
        op: dict[str, Any] = {"operationId": op_id, "summary": summary, **extra, "responses": responses}
        if needs == PUBLIC or not auth_enabled:
            op["security"] = []
        else:
            op["security"] = _KEYED
            op["x-tide-role"] = needs
            responses["401"] = _error("The API key is missing or unknown.", _WWW_AUTHENTICATE)
            if needs in ROLES:
                responses["403"] = _error(f"The API key lacks the {needs!r} role.")
        return op

    timeout_504 = _error(
        f"Not answered within {request_timeout:g} s (or the online-feature read was slower)."
    )

    def body_errors() -> dict[str, Any]:
        return {
            "400": _error("The body is not valid JSON, or Content-Length is invalid."),
            "404": _error("Unknown model name."),
            "408": _error(f"The body did not arrive within {body_timeout:g} s (the connection is closed)."),
            "413": _error(f"The body is larger than {max_body} bytes."),
            "422": _error("The body does not match the schema; `field` names the offending field."),
        }

    def score(name: str, schema: RequestSchema) -> dict[str, Any]:
        model = schema.inputs.model
        views = ", ".join(v.name for v in schema.inputs.views) or "none"
        entities = ", ".join(schema.join_keys) or "none"
        return operation(
            "post",
            SCORE_PATH.replace("{name}", name),
            f"score_{name}",
            f"Score with {name} ({model.task}){': ' + model.description if model.description else ''}",
            {
                "200": _json(
                    {"oneOf": [_ref(f"{name}.Prediction"), _ref(f"{name}.BatchPrediction")]},
                    "One prediction (single instance) or a batch's predictions, in order.",
                    {"X-Request-ID": {"schema": {"type": "string"}, "description": "The request's id."}},
                ),
                **body_errors(),
                "503": _error(
                    "No version of the model is loaded yet, or the online store is down.", _RETRY_AFTER
                ),
                "504": timeout_504,
            },
            description=(
                f'One instance, or a batch `{{"instances": [...]}}` of 1 to {schema.max_batch}. Each '
                f"names its entities (join keys: {entities}) and carries the request fields; the online "
                f"features of views {views} are read from the store in one round trip. The response "
                "names the model version and arm (champion or canary) that answered."
            ),
            parameters=[
                {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "description": "Id the prediction is logged under (batch items get -0, -1, ...); "
                    "made up when absent.",
                    "schema": {"type": "string"},
                },
            ],
            requestBody={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"oneOf": [_ref(f"{name}.Instance"), _ref(f"{name}.Batch")]}
                    },
                },
            },
        )

    paths: dict[str, Any] = {
        SCORE_PATH.replace("{name}", n): {"post": score(n, models[n])} for n in sorted(models)
    }
    paths.update(
        {
            "/healthz": {
                "get": operation(
                    "get", "/healthz", "healthz", "The process is up", {"200": _json(_ref("Health"), "Up.")}
                )
            },
            "/readyz": {
                "get": operation(
                    "get",
                    "/readyz",
                    "readyz",
                    "Ready: the models are loaded and the feature store answers",
                    {
                        "200": _json(_ref("Ready"), "Ready to score."),
                        "503": _json(_ref("NotReady"), "Not ready; `reasons` says why."),
                        "504": timeout_504,
                    },
                )
            },
            "/openapi.json": {
                "get": operation(
                    "get",
                    "/openapi.json",
                    "openapi",
                    "This document",
                    {"200": _json({"type": "object"}, "The OpenAPI document.")},
                )
            },
        }
    )
    paths.update(
        openapi_admin.paths(operation, _json, _error, name_param, body_errors(), {"504": timeout_504})
    )
    if settings.serve_metrics_auth != "off":
        paths["/metrics"] = {
            "get": operation(
                "get",
                "/metrics",
                "metrics",
                "Prometheus metrics (all workers of the node)",
                {
                    "200": {
                        "description": "Prometheus text exposition.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "504": timeout_504,
                },
            )
        }
    auth_note = (
        "Keyed operations take `Authorization: Bearer <key>` or `X-API-Key: <key>`; `x-tide-role` "
        "names the role the key needs."
        if auth_enabled
        else "No API keys are configured on this service: every operation is open."
    )
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Tide scoring service",
            "version": _version(),
            "description": "Real-time scoring with online features and hot-swapped models. " + auth_note,
        },
        "paths": paths,
        "components": {"schemas": _components(models, actions)},
    }
    if auth_enabled:
        doc["components"]["securitySchemes"] = copy.deepcopy(_SECURITY_SCHEMES)
    return doc


def _version() -> str:
    try:
        return metadata.version("tide-ml")
    except metadata.PackageNotFoundError:
        return "0.0.0"
