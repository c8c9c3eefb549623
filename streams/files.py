"""Reading records from files for ``tide produce``: JSON Lines, CSV and Avro object-container files.

Each reader yields :class:`Line` s: where a record is (its line number in a text file, its record
number in an Avro file, from 1) and the record, or why it could not be read. Checking a record against
the source's schema is :mod:`streams.produce`'s work; readers only turn the file into Python values the
way the schema asks for them.

- **JSON Lines** (``.jsonl``, ``.ndjson``, ``.json``): one JSON object per line, fields by name; blank
  lines are skipped. Union values are written plainly (``"x"``, not Avro JSON's ``{"string": "x"}``);
  ``bytes`` and ``fixed`` values are strings whose code points are the bytes (as in Avro's JSON
  encoding).
- **CSV** (``.csv``): a header row of field names, then one record per row (the line number is the row's
  first line). Each cell is converted to its field's type: ``int``/``long`` from integers (``12`` or
  ``12.0``), ``float``/``double`` from decimals, ``boolean`` from ``true``/``false``/``1``/``0``/``yes``
  /``no`` (any case), ``string`` and enum symbols as they are, ``bytes`` as the cell's UTF-8 bytes, and
  records, arrays and maps from a JSON cell. An empty cell is null when the field is nullable, else the
  field's default when it has one, else the empty string of a string field (and an error otherwise);
  a missing column takes the field's default. Unions take the first branch the cell converts to.
- **Avro** (``.avro``): an object container file, read with the schema written in it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro

from infra.errors import StreamError

FORMATS: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "csv": (".csv",),
    "avro": (".avro",),
}
AVRO_MAGIC = b"Obj\x01"
_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})


@dataclass(frozen=True, slots=True)
class Line:
    """One record read from a file (``record``), or why it could not be read (``error``)."""

    number: int
    record: dict[str, Any] | None = None
    error: str | None = None


def detect_format(path: Path, fmt: str | None = None) -> str:
    """``fmt`` when given, else the format ``path``'s suffix names, else ``avro`` for a file starting
    with the Avro container magic. Raises :class:`StreamError` when none applies."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise StreamError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower()
    for name, suffixes in FORMATS.items():
        if suffix in suffixes:
            return name
    with path.open("rb") as fh:
        if fh.read(len(AVRO_MAGIC)) == AVRO_MAGIC:
            return "avro"
    raise StreamError(f"cannot tell the format of {path} from its name: pass --format jsonl, csv or avro")


def read_file(path: Path, fmt: str, schema: Mapping[str, Any]) -> Iterator[Line]:
    """Every record of ``path`` in format ``fmt``; ``schema`` is the parsed schema the records are for."""
    if fmt == "jsonl":
        return read_jsonl(path, schema)
    if fmt == "csv":
        return read_csv(path, schema)
    if fmt == "avro":
        return read_avro(path)
    raise StreamError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


# -- JSON Lines ----------------------------------------------------------------------------------------


def read_jsonl(path: Path, schema: Mapping[str, Any]) -> Iterator[Line]:
    named = schema.get("__named_schemas", {})
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Line(number, error=f"not UTF-8 text: {exc}")
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as exc:
                yield Line(number, error=f"not JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                yield Line(number, error=f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield Line(number, from_json(schema, obj, named))


def from_json(node: Any, value: Any, named: Mapping[str, Any]) -> Any:
    """``value`` parsed from JSON, with strings turned into bytes where ``node`` (a parsed schema) holds
    ``bytes`` or ``fixed``. Anything that does not fit is left for validation to report."""
    if isinstance(node, str):
        if node in named:
            return from_json(named[node], value, named)
        if node == "bytes" and isinstance(value, str):
            return _latin1(value)
        return value
    if isinstance(node, list):
        branch = _json_branch(node, value, named)
        return value if branch is None else from_json(branch, value, named)
    kind = node.get("type")
    if kind == "record" and isinstance(value, dict):
        types = {f["name"]: f["type"] for f in node["fields"]}
        return {k: from_json(types[k], v, named) if k in types else v for k, v in value.items()}
    if kind == "array" and isinstance(value, list):
        return [from_json(node["items"], v, named) for v in value]
    if kind == "map" and isinstance(value, dict):
        return {k: from_json(node["values"], v, named) for k, v in value.items()}
    if kind == "fixed" and isinstance(value, str):
        return _latin1(value)
    if isinstance(kind, str) and kind not in ("record", "array", "map", "enum", "fixed"):
        return from_json(kind, value, named)  # a primitive written as {"type": ...}
    return value


def _json_branch(union: list[Any], value: Any, named: Mapping[str, Any]) -> Any | None:
    """The branch of ``union`` a JSON value belongs to, when it needs converting (bytes, or a container
    that may hold bytes); None when the value stays as it is."""
    resolved = [named.get(b, b) if isinstance(b, str) else b for b in union]
    if isinstance(value, str):
        if "string" in resolved or any(isinstance(b, dict) and b["type"] == "enum" for b in resolved):
            return None
        return next(
            (b for b in resolved if b == "bytes" or (isinstance(b, dict) and b["type"] == "fixed")), None
        )
    shapes = ("record", "map") if isinstance(value, dict) else ("array",) if isinstance(value, list) else ()
    return next((b for b in resolved if isinstance(b, dict) and b["type"] in shapes), None)


def _latin1(text: str) -> bytes | str:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text  # not bytes in Avro's JSON encoding: validation names the field


# -- CSV -----------------------------------------------------------------------------------------------


def read_csv(path: Path, schema: Mapping[str, Any]) -> Iterator[Line]:
    named = schema.get("__named_schemas", {})
    fields = {f["name"]: f for f in schema["fields"]}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh, strict=True)
        number = 1
        try:
            header = next(rows, None)
            if header is None:
                return
            problem = _header_problem(header, fields)
            if problem is not None:
                yield Line(1, error=problem)
                if problem.startswith("missing"):
                    return  # every row would fail the same way
            columns = [(i, fields[name]) for i, name in enumerate(header) if name in fields]
            number = rows.line_num + 1
            for row in rows:
                if row:
                    yield _csv_line(number, row, len(header), columns, named)
                number = rows.line_num + 1
        except (csv.Error, UnicodeDecodeError) as exc:
            yield Line(number, error=f"unreadable CSV ({exc}); reading stopped")


def _header_problem(header: list[str], fields: Mapping[str, Mapping[str, Any]]) -> str | None:
    known = ", ".join(fields)
    if dupes := sorted({c for c in header if header.count(c) > 1}):
        return f"repeated column(s) {', '.join(dupes)}"
    if unknown := [c for c in header if c not in fields]:
        return f"unknown column(s) {', '.join(unknown)}; the schema's fields: {known}"
    required = [n for n, f in fields.items() if n not in header and "default" not in f]
    if required:
        return f"missing column(s) {', '.join(required)} (fields without a default)"
    return None


def _csv_line(
    number: int,
    row: list[str],
    width: int,
    columns: list[tuple[int, Mapping[str, Any]]],
    named: Mapping[str, Any],
) -> Line:
    if len(row) != width:
        return Line(number, error=f"{len(row)} cells, the header has {width}")
    record: dict[str, Any] = {}
    for i, field in columns:
        name, text = field["name"], row[i]
        if text == "" and not _nullable(field["type"]) and "default" in field:
            continue  # the default applies
        try:
            record[name] = from_cell(field["type"], text, named)
        except ValueError as exc:
            return Line(number, error=f"field {name!r}: {exc}")
    return Line(number, record)


def _nullable(node: Any) -> bool:
    return isinstance(node, list) and "null" in node


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        number = float(text)  # "12.0", as tools that write integer columns as floats do
        if not (math.isfinite(number) and number.is_integer()):
            raise
        return int(number)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


_CELL: dict[str, Callable[[str], Any]] = {
    "int": _int,
    "long": _int,
    "float": float,
    "double": float,
    "boolean": _bool,
    "string": str,
    "bytes": lambda text: text.encode("utf-8"),
}


def _type_name(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return " | ".join(_type_name(b) for b in node)
    return str(node.get("name") or node["type"])


def from_cell(node: Any, text: str, named: Mapping[str, Any]) -> Any:
    """The value of one CSV cell for schema ``node``; raises ValueError naming what was expected."""
    if isinstance(node, str) and node in named:
        return from_cell(named[node], text, named)
    if isinstance(node, list):
        if text == "" and "null" in node:
            return None
        for branch in node:
            if branch == "null":
                continue
            try:
                return from_cell(branch, text, named)
            except ValueError:
                continue
        raise ValueError(f"expected {_type_name(node)}, got {text!r}")
    if isinstance(node, str):
        if node == "null":
            if text == "":
                return None
            raise ValueError(f"expected null (an empty cell), got {text!r}")
        try:
            return _CELL[node](text)
        except (ValueError, KeyError):
            raise ValueError(f"expected {node}, got {text!r}") from None
    kind = node["type"]
    if kind == "enum":
        return text
    if kind == "fixed":
        return text.encode("utf-8")
    if kind in ("record", "array", "map"):
        try:
            return from_json(node, json.loads(text), named)
        except ValueError:
            raise ValueError(f"expected {_type_name(node)} as JSON, got {text!r}") from None
    return from_cell(kind, text, named)  # a primitive written as {"type": ...}, maybe a logical type


# -- Avro object container files -----------------------------------------------------------------------


def read_avro(path: Path) -> Iterator[Line]:
    with path.open("rb") as fh:
        try:
            records = iter(fastavro.reader(fh))
        except Exception as exc:
            yield Line(1, error=f"not an Avro object container file: {exc}")
            return
        number = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as exc:  # a corrupt or truncated block: nothing after it can be read
                yield Line(number + 1, error=f"unreadable ({type(exc).__name__}: {exc}); reading stopped")
                return
            number += 1
            if not isinstance(record, dict):
                yield Line(number, error=f"expected a record, the file holds {type(record).__name__} values")
                continue
            yield Line(number, record)
