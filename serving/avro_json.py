"""JSON Schema of Avro record fields, as :mod:`serving.validation` converts JSON values."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# Avro primitive -> JSON Schema, as serving.validation converts JSON values (an integer is a number).
AVRO_TO_JSON: dict[str, dict[str, Any]] = {
    "double": {"type": "number"},
    "float": {"type": "number"},
    "int": {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1},
    "long": {"type": "integer", "format": "int64", "minimum": -(2**63), "maximum": 2**63 - 1},
    "boolean": {"type": "boolean"},
    "string": {"type": "string"},
}


def avro_field_schema(field: Mapping[str, Any]) -> dict[str, Any]:
    """JSON Schema of an Avro record field: a primitive, or a primitive or null (``["null", T]``)."""
    kind = field["type"]
    nullable = isinstance(kind, list)
    if nullable:
        others = [k for k in kind if k != "null"]
        if len(others) != 1 or len(kind) != 2:
            raise TypeError(f"field {field['name']!r}: only [null, primitive] unions are supported")
        kind = others[0]
    if not isinstance(kind, str) or kind not in AVRO_TO_JSON:
        raise TypeError(f"field {field['name']!r} has type {kind!r}; only primitives are supported")
    out = copy.deepcopy(AVRO_TO_JSON[kind])
    if nullable:
        out["type"] = [out["type"], "null"]
    if "doc" in field:
        out["description"] = field["doc"]
    return out
