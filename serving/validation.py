"""Scoring request bodies: parsing and validation into :class:`ScoreRequest` values.

A body is one instance ``{"entity", "event_id"?, "features"}`` or a batch ``{"instances": [...]}``.
Every request field of the model must be present with its event-schema type; errors name the field
(``features.amount``, ``instances[3].entity``) and carry their HTTP status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from infra.errors import RequestError
from models.inputs import REQUEST_FIELD_TYPES

MAX_BATCH = 256
_INSTANCE_KEYS = frozenset({"entity", "event_id", "features"})


@dataclass(frozen=True)
class ScoreRequest:
    entity: str
    event_id: str | None
    fields: dict[str, Any]  # the request fields, converted to their schema types


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A body that must be one JSON object. Raises :class:`RequestError` (400 for bad JSON)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"body is not valid JSON: {exc}", status=400) from None
    if not isinstance(data, dict):
        raise RequestError(f"body must be a JSON object, got {_json_type(data)}")
    return data


def parse_body(body: bytes) -> tuple[list[ScoreRequest], bool]:
    """The instances of a scoring body and whether it was a batch. Raises :class:`RequestError`."""
    data = parse_json_object(body)
    if "instances" not in data:
        return [parse_instance(data, "")], False
    extra = sorted(data.keys() - {"instances"})
    if extra:
        raise RequestError("a batch body holds only 'instances'", field=extra[0])
    instances = data["instances"]
    if not isinstance(instances, list):
        raise RequestError(f"must be an array, got {_json_type(instances)}", field="instances")
    if not 1 <= len(instances) <= MAX_BATCH:
        raise RequestError(f"must hold 1 to {MAX_BATCH} instances, got {len(instances)}", field="instances")
    return [parse_instance(item, f"instances[{i}].") for i, item in enumerate(instances)], True


def parse_instance(data: Any, prefix: str = "") -> ScoreRequest:
    """One instance; ``prefix`` is prepended to field names in errors."""
    if not isinstance(data, dict):
        raise RequestError(f"must be an object, got {_json_type(data)}", field=prefix.rstrip(".") or None)
    unknown = sorted(data.keys() - _INSTANCE_KEYS)
    if unknown:
        raise RequestError("unknown field", field=prefix + unknown[0])
    entity = data.get("entity")
    if not isinstance(entity, str) or not entity:
        raise RequestError("must be a non-empty string", field=prefix + "entity")
    event_id = data.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise RequestError(f"must be a string or null, got {_json_type(event_id)}", field=prefix + "event_id")
    features = data.get("features")
    if not isinstance(features, dict):
        raise RequestError(f"must be an object, got {_json_type(features)}", field=prefix + "features")
    unknown = sorted(features.keys() - REQUEST_FIELD_TYPES.keys())
    if unknown:
        raise RequestError("unknown feature", field=f"{prefix}features.{unknown[0]}")
    fields: dict[str, Any] = {}
    for name, kind in REQUEST_FIELD_TYPES.items():
        where = f"{prefix}features.{name}"
        if name not in features:
            raise RequestError("missing", field=where)
        fields[name] = _convert(features[name], kind, where)
    return ScoreRequest(entity, event_id, fields)


def _convert(value: Any, kind: str, where: str) -> Any:
    if kind in ("double", "float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind in ("int", "long"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "boolean":
        if isinstance(value, bool):
            return value
    elif kind == "string" and isinstance(value, str):
        return value
    raise RequestError(f"must be a {_EXPECTED[kind]}, got {_json_type(value)}", field=where)


_EXPECTED = {
    "double": "number",
    "float": "number",
    "int": "integer",
    "long": "integer",
    "boolean": "boolean (true or false)",
    "string": "string",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
