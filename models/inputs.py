"""The feature vector a model scores: request fields typed by the event schema, plus online features.

The types of the request fields are read from the Avro ``event`` schema, so validation, warm-up inputs
and the logged feature map all follow the one definition of the event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from features.store import FeatureRow
from examples.fraud.model import REQUEST_FIELDS
from schemas import codec

# Avro primitive type -> the neutral value used for synthetic (warm-up) inputs.
_ZERO: dict[str, Any] = {"double": 0.0, "float": 0.0, "int": 0, "long": 0, "string": "", "boolean": False}


def _request_field_types() -> dict[str, str]:
    fields = {f["name"]: f["type"] for f in codec.schema("event")["fields"]}
    types: dict[str, str] = {}
    for name in REQUEST_FIELDS:
        kind = fields[name]
        if not isinstance(kind, str) or kind not in _ZERO:
            raise TypeError(f"event field {name!r} has type {kind!r}; request fields must be primitives")
        types[name] = kind
    return types


# Request field name -> Avro primitive type, in REQUEST_FIELDS order.
REQUEST_FIELD_TYPES: dict[str, str] = _request_field_types()


def synthetic_input(feature_names: Iterable[str]) -> dict[str, Any]:
    """A neutral input over ``feature_names``: zero, ``""`` or ``False`` by each field's type."""
    return {name: _ZERO[REQUEST_FIELD_TYPES.get(name, "double")] for name in feature_names}


def assemble(request_fields: Mapping[str, Any], row: FeatureRow) -> dict[str, Any]:
    """The exact input scored and logged: the request's fields, then the entity's online features."""
    x = dict(request_fields)
    x.update(row.values)
    return x
