"""Scoring request bodies: parsing and validation into :class:`ScoreRequest` values, per model.

A body is one instance or a batch ``{"instances": [...]}``. An instance is::

    {"entities": {join key: value, ...}, "event_id": optional string, "features": {request field: value}}

``entities`` names a value for each join key of the entities the model's views are kept per; a model
read for exactly one join key also takes ``"entity": "value"`` as shorthand. ``features`` holds every
request field of the model with its request-source type. A model with no online features takes no
entities. Errors name the field (``features.price``, ``entities.user_id``,
``instances[3].features.x``) and carry their HTTP status. What a model's body looks like is one
:class:`RequestSchema`, built from its definition (:class:`models.inputs.ModelInputs`), and the OpenAPI
document is built from the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from infra.errors import RequestError
from models.inputs import ModelInputs, RequestField

MAX_BATCH = 256
INTEGER_KEYS = frozenset({"int", "long"})


@dataclass(frozen=True)
class ScoreRequest:
    entities: dict[str, str]  # join key -> entity value (as the online store keys it)
    event_id: str | None
    fields: dict[str, Any]  # the request fields, converted to their schema types


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A body that must be one JSON object. Raises :class:`RequestError` (400 for bad JSON)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"body is not valid JSON: {exc}", status=400) from None
    if not isinstance(data, dict):
        raise RequestError(f"body must be a JSON object, got {json_type(data)}")
    return data


class RequestSchema:
    """What one model's scoring bodies must hold, and the parser that checks them."""

    def __init__(self, inputs: ModelInputs, max_batch: int = MAX_BATCH) -> None:
        self.inputs = inputs
        self.max_batch = max_batch
        self.fields: tuple[RequestField, ...] = inputs.request_fields
        self.field_names = frozenset(f.name for f in self.fields)
        self.join_keys = inputs.join_keys
        self.join_key_types = dict(inputs.join_key_types)
        self.shorthand = len(self.join_keys) == 1  # "entity": "value" is accepted
        keys = {"entities", "event_id", "features"} | ({"entity"} if self.shorthand else set())
        self.instance_keys = frozenset(keys)

    def parse_body(self, body: bytes) -> tuple[list[ScoreRequest], bool]:
        """The instances of a scoring body and whether it was a batch. Raises :class:`RequestError`."""
        data = parse_json_object(body)
        if "instances" not in data:
            return [self.parse_instance(data, "")], False
        extra = sorted(data.keys() - {"instances"})
        if extra:
            raise RequestError("a batch body holds only 'instances'", field=extra[0])
        instances = data["instances"]
        if not isinstance(instances, list):
            raise RequestError(f"must be an array, got {json_type(instances)}", field="instances")
        if not 1 <= len(instances) <= self.max_batch:
            raise RequestError(
                f"must hold 1 to {self.max_batch} instances, got {len(instances)}", field="instances"
            )
        return [self.parse_instance(item, f"instances[{i}].") for i, item in enumerate(instances)], True

    def parse_instance(self, data: Any, prefix: str = "") -> ScoreRequest:
        """One instance; ``prefix`` is prepended to field names in errors."""
        if not isinstance(data, dict):
            raise RequestError(f"must be an object, got {json_type(data)}", field=prefix.rstrip(".") or None)
        unknown = sorted(data.keys() - self.instance_keys)
        if unknown:
            raise RequestError("unknown field", field=prefix + unknown[0])
        entities = self._entities(data, prefix)
        event_id = data.get("event_id")
        if event_id is not None and not isinstance(event_id, str):
            raise RequestError(
                f"must be a string or null, got {json_type(event_id)}", field=prefix + "event_id"
            )
        features = data.get("features")
        if not isinstance(features, dict):
            raise RequestError(f"must be an object, got {json_type(features)}", field=prefix + "features")
        unknown = sorted(features.keys() - self.field_names)
        if unknown:
            raise RequestError("unknown request field", field=f"{prefix}features.{unknown[0]}")
        fields: dict[str, Any] = {}
        for f in self.fields:
            where = f"{prefix}features.{f.name}"
            if f.name not in features:
                raise RequestError("missing", field=where)
            value = features[f.name]
            fields[f.name] = None if value is None and f.nullable else convert(value, f.type, where)
        return ScoreRequest(entities, event_id, fields)

    def _entities(self, data: dict[str, Any], prefix: str) -> dict[str, str]:
        if "entity" in data:
            if "entities" in data:
                raise RequestError("give either 'entity' or 'entities', not both", field=prefix + "entity")
            return {
                self.join_keys[0]: self._entity_value(data["entity"], self.join_keys[0], prefix + "entity")
            }
        if "entities" not in data and not self.join_keys:
            return {}
        given = data.get("entities")
        if not isinstance(given, dict):
            raise RequestError(
                f"must be an object of {', '.join(self.join_keys)}, got {json_type(given)}",
                field=prefix + "entities",
            )
        unknown = sorted(given.keys() - set(self.join_keys))
        if unknown:
            raise RequestError(
                f"not an entity the model is read for ({', '.join(self.join_keys) or 'none'})",
                field=f"{prefix}entities.{unknown[0]}",
            )
        out = {}
        for key in self.join_keys:
            where = f"{prefix}entities.{key}"
            if key not in given:
                raise RequestError("missing", field=where)
            out[key] = self._entity_value(given[key], key, where)
        return out

    def _entity_value(self, value: Any, key: str, where: str) -> str:
        if self.join_key_types.get(key) in INTEGER_KEYS:
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, str) and value and _is_integer_text(value):
                return str(int(value))
            raise RequestError(f"must be an integer, got {json_type(value)}", field=where)
        if not isinstance(value, str) or not value:
            raise RequestError("must be a non-empty string", field=where)
        return value


def _is_integer_text(value: str) -> bool:
    body = value[1:] if value[:1] == "-" else value
    return body.isascii() and body.isdigit()


def convert(value: Any, kind: str, where: str) -> Any:
    """``value`` as a request field of Avro type ``kind``; :class:`RequestError` naming ``where``."""
    if kind in ("double", "float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind in ("int", "long"):
        if isinstance(value, int) and not isinstance(value, bool):
            bound = 2**31 if kind == "int" else 2**63
            if -bound <= value < bound:
                return value
            raise RequestError(f"must be a {kind} integer, got one out of range", field=where)
    elif kind == "boolean":
        if isinstance(value, bool):
            return value
    elif kind == "string" and isinstance(value, str):
        return value
    raise RequestError(f"must be a {EXPECTED[kind]}, got {json_type(value)}", field=where)


EXPECTED = {
    "double": "number",
    "float": "number",
    "int": "integer",
    "long": "integer",
    "boolean": "boolean (true or false)",
    "string": "string",
}


def json_type(value: Any) -> str:
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
