"""The admin part of the OpenAPI document (:mod:`serving.admin`): the model list, versions, deployments
and their outcomes. The deployment body and record follow the Avro ``deployment`` schema and
:data:`serving.deployments.ACTION_RULES`; a version's fields are :data:`serving.ledger.SUMMARY_FIELDS`,
typed by the Avro ``model_version`` schema where it is a primitive."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from schemas import codec
from serving.avro_json import avro_field_schema
from serving.deployments import ACTION_RULES, ACTIONS, MAX_VERSION
from serving.ledger import APPLIED, PENDING, REFUSED, SUMMARY_FIELDS

STATUSES = ("champion", "canary", "shadow", "previous", "unblessed", "refused", "published")
Operation = Callable[..., dict[str, Any]]
Json = Callable[..., dict[str, Any]]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _fields(record: str) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in codec.schema(record)["fields"]}


def _field_schema(field: Mapping[str, Any]) -> dict[str, Any]:
    """A loose JSON Schema of an Avro field: primitives typed, anything else left open."""
    try:
        return avro_field_schema(field)
    except TypeError:
        return {"description": field.get("doc", "")}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        schema["type"] = [kind, "null"]
    return schema


def deployment_body_schema(rules: Mapping[str, tuple[str, bool]]) -> dict[str, Any]:
    """One shape per action (:data:`serving.deployments.ACTION_RULES`): which take a version, a weight.
    ``id`` and ``source`` are set by the service."""
    fields = _fields("deployment")
    version = _field_schema(fields["version"])
    weight = {**_field_schema(fields["weight"]), "minimum": 0.0, "maximum": 1.0, "default": 0.0}
    reason = _field_schema(fields["reason"])
    shapes = []
    for action, (needs_version, takes_weight) in rules.items():
        props: dict[str, Any] = {"action": {"const": action}, "reason": reason}
        if needs_version != "absent":
            props["version"] = {"type": "integer", "minimum": 1, "maximum": MAX_VERSION}
            if needs_version == "optional":
                props["version"] = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_VERSION}
            props["version"]["description"] = version.get("description", "")
        else:
            props["version"] = {"type": "null"}
        props["weight"] = weight if takes_weight else {"const": 0, "description": "Takes no weight."}
        required = ["action", "version"] if needs_version == "required" else ["action"]
        shapes.append(
            {"type": "object", "properties": props, "required": required, "additionalProperties": False}
        )
    return {"oneOf": shapes}


def components(actions: Sequence[str], error: dict[str, Any]) -> dict[str, Any]:
    deployment = _fields("deployment")
    record = {
        "type": "object",
        "description": codec.schema("deployment").get("doc", ""),
        "properties": {n: _field_schema(f) for n, f in deployment.items()},
        "required": list(deployment),
    }
    nullable_string = {"type": ["string", "null"]}
    outcome = {
        "type": "object",
        "description": "A deployment and its outcome on this node.",
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string"},
            "action": {"type": "string", "enum": list(ACTIONS)},
            "version": {"type": ["integer", "null"]},
            "weight": {"type": "number"},
            "reason": {**nullable_string, "description": "Why it was published."},
            "source": {**nullable_string, "description": "Who published it: api, cli, judge, retrain."},
            "ts": {"type": ["integer", "null"]},
            "status": {
                "type": "string",
                "enum": [PENDING, APPLIED, REFUSED],
                "description": "pending: not read back yet, or held for a version not published yet; "
                "applied; refused (see status_reason).",
            },
            "status_reason": {**nullable_string, "description": "Why it is pending or was refused."},
            "received_ts": {"type": "integer"},
            "decided_ts": {"type": ["integer", "null"]},
        },
        "required": ["id", "model", "action", "status"],
    }
    versions = _fields("model_version")
    # Every field but the version may be null: a version loaded without its record has only some.
    version_props: dict[str, Any] = {n: _nullable(_field_schema(versions[n])) for n in SUMMARY_FIELDS}
    version_props["version"] = {"type": "integer"}
    version_props.update(
        {
            "status": {"type": "string", "enum": list(STATUSES)},
            "status_reason": {**nullable_string, "description": "Why it is unblessed or refused."},
            "verdicts": {
                "type": "array",
                "description": "Its newest canary verdicts (canary_verdict records), oldest first.",
                "items": {"type": "object"},
            },
        }
    )
    refused = copy.deepcopy(error)
    refused["properties"].update(
        {
            "model": {"type": "string"},
            "action": {"type": "string"},
            "version": {"type": ["integer", "null"]},
            "reason": {"type": "string", "description": "Why this node will not apply it."},
        }
    )
    refused["required"] = ["error", "model", "action", "version", "reason"]
    return {
        "ModelList": {
            "type": "object",
            "properties": {
                "models": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "description": "A model: its loaded versions, aliases, traffic split, unblessed "
                        "versions and deployments pending.",
                        "properties": {"name": {"type": "string"}, "pending": {"type": "array"}},
                        "required": ["name"],
                    },
                }
            },
            "required": ["models"],
        },
        "DeploymentRequest": deployment_body_schema({a: ACTION_RULES[a] for a in actions}),
        "DeploymentAccepted": {
            "type": "object",
            "properties": {
                "deployment": record,
                "outcome": {"oneOf": [_ref("DeploymentOutcome"), {"type": "null"}]},
            },
            "required": ["deployment"],
        },
        "DeploymentOutcome": outcome,
        "DeploymentList": {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "deployments": {"type": "array", "items": _ref("DeploymentOutcome")},
            },
            "required": ["model", "deployments"],
        },
        "DeploymentRefused": refused,
        "ModelVersion": {
            "type": "object",
            "properties": version_props,
            "required": ["version", "status", "verdicts"],
        },
        "VersionList": {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "versions": {"type": "array", "items": _ref("ModelVersion")},
            },
            "required": ["model", "versions"],
        },
    }


def paths(
    operation: Operation,
    json: Json,
    error: Json,
    name_param: dict[str, Any],
    body_errors: dict[str, Any],
    common: dict[str, Any],
) -> dict[str, Any]:
    """The admin paths. ``common``: responses every operation may give (504)."""
    id_param = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "The deployment's id (as the 202 answered).",
        "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
    }
    unknown = {"404": error("Unknown model name.")}
    deploy = operation(
        "post",
        "/v1/models/{name}/deployments",
        "deploy",
        "Change which versions serve traffic (admin)",
        {
            "202": json(
                _ref("DeploymentAccepted"),
                "Published to the deployments topic; every node applies it when it reads it back. Its "
                "outcome on this node is at Location.",
                {"Location": {"schema": {"type": "string"}, "description": "The deployment's outcome."}},
            ),
            **body_errors,
            "409": json(
                _ref("DeploymentRefused"),
                "Refused: a version never published for the model, unblessed (promote, canary, rollback), "
                "failed to load or refused by its lineage; or a rollback with nothing to roll back to.",
            ),
            "503": error("The deployments topic could not be written."),
            **common,
        },
        parameters=[name_param],
        requestBody={
            "required": True,
            "content": {"application/json": {"schema": _ref("DeploymentRequest")}},
        },
    )
    return {
        "/v1/models/{name}/deployments": {
            "post": deploy,
            "get": operation(
                "get",
                "/v1/models/{name}/deployments",
                "listDeployments",
                "Recent deployments of a model with their outcomes on this node, newest first (admin)",
                {"200": json(_ref("DeploymentList"), "Deployments."), **unknown, **common},
                parameters=[name_param],
            ),
        },
        "/v1/models/{name}/deployments/{id}": {
            "get": operation(
                "get",
                "/v1/models/{name}/deployments/{id}",
                "getDeployment",
                "One deployment's outcome on this node: pending, applied or refused (admin)",
                {
                    "200": json(_ref("DeploymentOutcome"), "The deployment and its outcome."),
                    "404": error("Unknown model, or no deployment of that id read here."),
                    **common,
                },
                parameters=[name_param, id_param],
            )
        },
        "/v1/models/{name}/versions": {
            "get": operation(
                "get",
                "/v1/models/{name}/versions",
                "listVersions",
                "Every version published: lineage, blessing, canary verdicts and status (admin)",
                {"200": json(_ref("VersionList"), "Versions, oldest first."), **unknown, **common},
                parameters=[name_param],
            )
        },
        "/v1/models": {
            "get": operation(
                "get",
                "/v1/models",
                "listModels",
                "Loaded versions, aliases, traffic split, unblessed versions and pending deployments "
                "of each model (admin)",
                {"200": json(_ref("ModelList"), "Every model served."), **common},
            )
        },
    }
