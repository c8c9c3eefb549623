"""Avro codecs for every record that crosses a process boundary.

Payloads use Avro single-object encoding: ``0xC3 0x01``, the writer schema's 8-byte CRC-64-AVRO
fingerprint (little-endian, as the Avro spec and Java write it), then the schemaless Avro body.
Schemas live in ``avro/<name>/v<N>.avsc``; every version is kept, the highest ``N`` is current.
:func:`encode` always writes the current version; :func:`decode` reads any known version of any
record and resolves it to that record's current version.
"""

from __future__ import annotations

import io
import json
import logging
import re
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint as _avro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import ValidationError
from fastavro.validation import validate as _validate

from infra.errors import SchemaError, UnknownSchemaError

logger = logging.getLogger(__name__)

AVRO_DIR = Path(__file__).parent / "avro"
MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8
RECORD_NAMES: tuple[str, ...] = (
    "prediction",
    "model_version",
    "deployment",
    "drift_alert",
    "definitions",
    "canary_verdict",
    "checkpoint",
)

_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")
_INT_RANGE = (-(1 << 31), (1 << 31) - 1)
_LONG_RANGE = (-(1 << 63), (1 << 63) - 1)
_repr = reprlib.Repr()  # keyword arguments only from Python 3.12
_repr.maxstring = _repr.maxother = 40


def load_schemas(root: Path = AVRO_DIR) -> dict[str, dict[int, dict[str, Any]]]:
    """Parse every ``<name>/v<N>.avsc`` under ``root``: ``{name: {version: parsed schema}}``."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(root.glob("*/v*.avsc")):
        match = _VERSION_FILE.fullmatch(path.name)
        if match is None:
            raise SchemaError(f"schema file {path} is not named v<N>.avsc")
        try:
            parsed = cast(dict[str, Any], parse_schema(json.loads(path.read_text(encoding="utf-8"))))
        except Exception as exc:
            raise SchemaError(f"cannot parse schema file {path}: {exc}") from exc
        found.setdefault(path.parent.name, {})[int(match.group(1))] = parsed
    return {name: dict(sorted(by_version.items())) for name, by_version in sorted(found.items())}


def schema_fingerprint(parsed: dict[str, Any] | str | list[Any]) -> bytes:
    """CRC-64-AVRO fingerprint of a parsed schema's canonical form, as the 8 bytes of the header."""
    return bytes.fromhex(_avro_fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


# Parsed once at import. _BY_FP maps a fingerprint to (name, version, writer schema, reader schema or
# None when the writer is the current version, so decoding it needs no schema resolution).
_SCHEMAS: dict[str, dict[int, dict[str, Any]]] = {}
_FINGERPRINTS: dict[tuple[str, int], bytes] = {}
_BY_FP: dict[bytes, tuple[str, int, dict[str, Any], dict[str, Any] | None]] = {}
_CURRENT: dict[str, tuple[dict[str, Any], bytes, frozenset[str]]] = {}


def _install(name: str, by_version: dict[int, dict[str, Any]]) -> None:
    latest = max(by_version)
    for version, parsed in by_version.items():
        fp = schema_fingerprint(parsed)
        other = _BY_FP.get(fp)
        if other is not None and other[0] != name:
            raise SchemaError(f"{name} v{version} has the same fingerprint as {other[0]} v{other[1]}")
    for fp, entry in list(_BY_FP.items()):  # a re-registered record drops its old entries first
        if entry[0] == name:
            del _BY_FP[fp]
    for version, parsed in by_version.items():
        fp = schema_fingerprint(parsed)
        _FINGERPRINTS[name, version] = fp
        _BY_FP[fp] = (name, version, parsed, None if version == latest else by_version[latest])
    _SCHEMAS[name] = dict(sorted(by_version.items()))
    _CURRENT[name] = (
        by_version[latest],
        MAGIC + _FINGERPRINTS[name, latest],
        frozenset(f["name"] for f in by_version[latest]["fields"]),
    )


def register(name: str, versions: Sequence[Mapping[str, Any]]) -> None:
    """Make a source's record schemas known (oldest first; the last is current) under ``name``.

    Sources are declared by projects and registered when a service loads its definitions; records of
    every registered version decode, resolved to the current one. Tide's own records cannot be replaced.
    """
    if name in RECORD_NAMES:
        raise SchemaError(f"{name!r} is one of Tide's own records and cannot be registered")
    parsed: dict[int, dict[str, Any]] = {}
    for i, raw in enumerate(versions, start=1):
        try:
            parsed[i] = cast(dict[str, Any], parse_schema(json.loads(json.dumps(raw))))
        except Exception as exc:
            raise SchemaError(f"source {name!r}: schema version {i} does not parse: {exc}") from exc
    if not parsed:
        raise SchemaError(f"source {name!r}: no schema given")
    _install(name, parsed)


for _name, _by_version in load_schemas().items():
    _install(_name, _by_version)
for _name in RECORD_NAMES:
    if not _SCHEMAS.get(_name):
        raise SchemaError(f"no schema files for record {_name!r} under {AVRO_DIR / _name}")
logger.debug("loaded %d schema versions of %d records", len(_BY_FP), len(_SCHEMAS))


def _current(name: str) -> tuple[dict[str, Any], bytes, frozenset[str]]:
    try:
        return _CURRENT[name]
    except KeyError:
        raise SchemaError(f"unknown record type {name!r}; known: {', '.join(sorted(_CURRENT))}") from None


def versions(name: str) -> list[int]:
    """All versions of record ``name``, ascending; the last is the current one."""
    _current(name)
    return list(_SCHEMAS[name])


def schema(name: str, version: int | None = None) -> dict[str, Any]:
    """The parsed schema of ``name`` (current version by default). Shared: do not mutate it."""
    _current(name)
    version = max(_SCHEMAS[name]) if version is None else version
    try:
        return _SCHEMAS[name][version]
    except KeyError:
        raise SchemaError(f"record {name!r} has no version {version}; known: {versions(name)}") from None


def fingerprint(name: str, version: int | None = None) -> bytes:
    """8-byte CRC-64-AVRO fingerprint (little-endian) of ``name`` (current version by default)."""
    schema(name, version)
    return _FINGERPRINTS[name, max(_SCHEMAS[name]) if version is None else version]


def encode(name: str, record: Mapping[str, Any], *, validate: bool = True) -> bytes:
    """Single-object-encode ``record`` with the current schema of ``name``.

    Fields with a default may be left out. With ``validate=True`` (the default) the record is
    checked first (about 40% of encode time) and unknown top-level keys are rejected.
    ``validate=False`` is for trusted hot paths only: missing fields and most wrong types still fail
    in the writer, but fastavro's writer coerces instead of checking (``1.5`` into an int field is
    written as ``1``, ``None`` or ``"yes"`` into a boolean as its truthiness, ``"12.5"`` into a double
    as ``12.5``, an int field out of 32-bit range is written anyway) and unknown keys are dropped.
    Raises :class:`SchemaError` naming the offending field path.
    """
    parsed, header, field_names = _current(name)
    if validate:
        if not isinstance(record, Mapping):
            raise SchemaError(f"invalid {name} record: expected a mapping, got {_describe(record)}")
        unknown = record.keys() - field_names
        if unknown:
            raise SchemaError(
                f"invalid {name} record: unknown field(s) {', '.join(sorted(map(str, unknown)))}"
            )
        if not _validate(record, parsed, raise_errors=False, disable_tuple_notation=True):  # type: ignore[call-arg]
            raise SchemaError(f"invalid {name} record: {_explain_invalid(parsed, record)}")
    buf = io.BytesIO()
    buf.write(header)
    try:
        schemaless_writer(buf, parsed, record, disable_tuple_notation=True)
    except Exception as exc:
        problem = _explain(parsed, record, "", parsed["__named_schemas"]) or f"{type(exc).__name__}: {exc}"
        raise SchemaError(f"invalid {name} record: {problem}") from exc
    return buf.getvalue()


def _lookup(data: bytes) -> tuple[str, int, dict[str, Any], dict[str, Any] | None]:
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        raise SchemaError(
            f"not an Avro single-object payload ({len(data)} bytes, starts with {data[:HEADER_SIZE].hex()!r})"
        )
    entry = _BY_FP.get(data[2:HEADER_SIZE])
    if entry is None:
        raise UnknownSchemaError(f"unknown schema fingerprint {data[2:HEADER_SIZE].hex()}")
    return entry


def record_name(data: bytes | bytearray | memoryview) -> str:
    """Short name of the record type in a single-object-encoded payload (reads only the header)."""
    return _lookup(bytes(data[:HEADER_SIZE]))[0]


def decode(data: bytes | bytearray | memoryview, expected: str | None = None) -> dict[str, Any]:
    """Decode a single-object payload written with any known version into the current version's shape.

    Raises :class:`UnknownSchemaError` for an unknown fingerprint and :class:`SchemaError` for a bad
    header, truncated or trailing bytes, or a record of another type than ``expected``.
    """
    if type(data) is not bytes:
        data = bytes(data)
    name, version, writer, reader = _lookup(data)
    if expected is not None and expected != name:
        raise SchemaError(f"expected a {expected} record, got {name} v{version}")
    fo = io.BytesIO(data)
    fo.seek(HEADER_SIZE)
    try:
        record = cast(dict[str, Any], schemaless_reader(fo, writer, reader))
    except Exception as exc:
        raise SchemaError(f"cannot decode {name} v{version} payload: {type(exc).__name__}: {exc}") from exc
    if fo.tell() != len(data):
        raise SchemaError(f"{name} v{version} payload has {len(data) - fo.tell()} trailing bytes")
    return record


def decode_named(
    data: bytes | bytearray | memoryview, expected: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(record name, record) of a single-object payload: :func:`decode` that also says what it read."""
    record = decode(data, expected)
    return record_name(data), record


# --- explaining why a datum does not match a schema ------------------------------------------------------


def _describe(datum: Any) -> str:
    return f"{type(datum).__name__} {_repr.repr(datum)}"


def _is_int_in(datum: Any, bounds: tuple[int, int]) -> bool:
    return isinstance(datum, int) and not isinstance(datum, bool) and bounds[0] <= datum <= bounds[1]


_PRIMITIVES = {
    "null": lambda d: d is None,
    "boolean": lambda d: isinstance(d, bool),
    "int": lambda d: _is_int_in(d, _INT_RANGE),
    "long": lambda d: _is_int_in(d, _LONG_RANGE),
    "float": lambda d: isinstance(d, int | float) and not isinstance(d, bool),
    "double": lambda d: isinstance(d, int | float) and not isinstance(d, bool),
    "string": lambda d: isinstance(d, str),
    "bytes": lambda d: isinstance(d, bytes | bytearray),
}


def _is_array(datum: Any) -> bool:
    return isinstance(datum, Sequence) and not isinstance(datum, str | bytes | bytearray)


def _type_name(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return " | ".join(_type_name(branch) for branch in node)
    return str(node.get("name") or node["type"])


def _explain(node: Any, datum: Any, path: str, named: Mapping[str, Any]) -> str | None:
    """The first reason ``datum`` does not match ``node``, naming its field path; None when it matches."""
    where = path or "record"
    if isinstance(node, str):
        if node in named:
            return _explain(named[node], datum, path, named)
        return (
            None if _PRIMITIVES[node](datum) else f"field {where!r}: expected {node}, got {_describe(datum)}"
        )
    if isinstance(node, list):
        if any(_explain(branch, datum, path, named) is None for branch in node):
            return None
        # Descend into the one branch of the datum's shape, to name the nested field at fault.
        kinds = ("record", "map") if isinstance(datum, Mapping) else ("array",) if _is_array(datum) else ()
        resolved = [named.get(b, b) if isinstance(b, str) else b for b in node]
        same = [b for b in resolved if isinstance(b, dict) and b["type"] in kinds]
        if len(same) == 1:
            return _explain(same[0], datum, path, named)
        return f"field {where!r}: expected {_type_name(node)}, got {_describe(datum)}"
    kind = node["type"]
    if kind == "record":
        if not isinstance(datum, Mapping):
            return f"field {where!r}: expected record {node['name']}, got {_describe(datum)}"
        for field in node["fields"]:
            sub = f"{path}.{field['name']}" if path else field["name"]
            if field["name"] not in datum:
                if "default" in field:
                    continue
                return f"field {sub!r} is missing (required {_type_name(field['type'])})"
            problem = _explain(field["type"], datum[field["name"]], sub, named)
            if problem:
                return problem
        return None
    if kind == "array":
        if not _is_array(datum):
            return f"field {where!r}: expected array, got {_describe(datum)}"
        for i, item in enumerate(datum):
            problem = _explain(node["items"], item, f"{path}[{i}]", named)
            if problem:
                return problem
        return None
    if kind == "map":
        if not isinstance(datum, Mapping):
            return f"field {where!r}: expected map, got {_describe(datum)}"
        for key, value in datum.items():
            if not isinstance(key, str):
                return f"field {where!r}: map keys must be strings, got {_describe(key)}"
            problem = _explain(node["values"], value, f"{path}[{key!r}]", named)
            if problem:
                return problem
        return None
    if kind == "enum":
        return (
            None
            if datum in node["symbols"]
            else f"field {where!r}: {_describe(datum)} is not in {node['symbols']}"
        )
    if kind == "fixed":
        ok = isinstance(datum, bytes) and len(datum) == node["size"]
        return None if ok else f"field {where!r}: expected {node['size']} bytes, got {_describe(datum)}"
    # A primitive written as {"type": ...}, maybe with a logicalType.
    return _explain(kind, datum, path, named)


def _explain_invalid(parsed: dict[str, Any], record: Mapping[str, Any]) -> str:
    """Why fastavro's validation rejected ``record``: our own path-naming walk, else fastavro's own words."""
    problem = _explain(parsed, record, "", parsed["__named_schemas"])
    if problem:
        return problem
    try:
        _validate(record, parsed, raise_errors=True, disable_tuple_notation=True)  # type: ignore[call-arg]
    except ValidationError as exc:
        return "; ".join(
            f"field {e.field!r}: {_describe(e.datum)} is not {_type_name(e.schema)}" for e in exc.errors
        )
    return "rejected by fastavro validation"


# --- backward compatibility ------------------------------------------------------------------------------

_SAMPLES: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "int": 7,
    "long": 1_700_000_000_000,
    "float": 0.5,
    "double": 1.25,
    "string": "sample",
    "bytes": b"\x00\x01",
}


def sample_datum(node: Any, variant: int = 0, named: Mapping[str, Any] | None = None, _depth: int = 0) -> Any:
    """A datum matching schema ``node``.

    Unions take branch ``min(variant, n - 1)``; arrays and maps hold one item.
    """
    if named is None:
        named = node.get("__named_schemas", {}) if isinstance(node, dict) else {}
    if isinstance(node, str):
        return sample_datum(named[node], variant, named, _depth) if node in named else _SAMPLES[node]
    if isinstance(node, list):
        branch = "null" if _depth > 16 and "null" in node else node[min(variant, len(node) - 1)]
        return sample_datum(branch, variant, named, _depth + 1)
    kind = node["type"]
    if kind == "record":
        return {f["name"]: sample_datum(f["type"], variant, named, _depth + 1) for f in node["fields"]}
    if kind == "array":
        return [sample_datum(node["items"], variant, named, _depth + 1)]
    if kind == "map":
        return {"key": sample_datum(node["values"], variant, named, _depth + 1)}
    if kind == "enum":
        return node["symbols"][min(variant, len(node["symbols"]) - 1)]
    if kind == "fixed":
        return b"\x00" * node["size"]
    return sample_datum(kind, variant, named, _depth)


def _union_width(node: Any, named: Mapping[str, Any], seen: set[str]) -> int:
    """The most branches of any union in ``node``: how many sample variants cover every branch."""
    if isinstance(node, str):
        if node not in named or node in seen:
            return 1
        seen.add(node)
        return _union_width(named[node], named, seen)
    if isinstance(node, list):
        return max([len(node), *(_union_width(branch, named, seen) for branch in node)])
    children = [f["type"] for f in node.get("fields", ())] + [
        node[k] for k in ("items", "values") if k in node
    ]
    return max([1, *(_union_width(child, named, seen) for child in children)])


def compatibility_problems(writer: dict[str, Any], reader: dict[str, Any]) -> list[str]:
    """Why data written with parsed schema ``writer`` cannot be read with ``reader``; empty when it can.

    Writes one sample datum per union branch with ``writer`` and reads it back through fastavro's
    schema resolution with ``reader``, so every branch of every union is exercised.
    """
    problems: list[str] = []
    for variant in range(_union_width(writer, writer.get("__named_schemas", {}), set())):
        buf = io.BytesIO()
        try:
            schemaless_writer(buf, writer, sample_datum(writer, variant))
            buf.seek(0)
            schemaless_reader(buf, writer, reader)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if problem not in problems:
                problems.append(problem)
    return problems


def check_compatibility(root: Path | None = None) -> list[str]:
    """Check every version of every record under ``root`` (default: ours) against its latest version.

    Returns one line per problem (empty when all is well): versions must run 1..N without gaps, and
    data written with any older version must be readable with the latest (backward compatibility).
    """
    loaded = _SCHEMAS if root is None else load_schemas(root)
    problems: list[str] = []
    for name, by_version in loaded.items():
        latest = max(by_version)
        if sorted(by_version) != list(range(1, latest + 1)):
            problems.append(f"{name}: versions {sorted(by_version)} do not run 1..{latest} without gaps")
        for version, writer in by_version.items():
            if version != latest:
                problems.extend(
                    f"{name} v{version} -> v{latest}: {problem}"
                    for problem in compatibility_problems(writer, by_version[latest])
                )
    return problems
