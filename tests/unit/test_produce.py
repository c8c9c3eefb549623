"""Reading JSON Lines, CSV and Avro files against a source's schema, and the all-or-nothing check of
``tide produce`` (no broker: a file with a bad record never reaches the producer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from infra.errors import DefinitionError, SchemaError, StreamError
from infra.settings import CommonSettings
from schemas import codec
from schemas.definitions import Project, Source
from streams import produce
from streams.files import Line, detect_format, read_file
from streams.produce import encode_record, produce_file
from streams.sources import find_source

METERS: dict[str, Any] = {
    "type": "record",
    "name": "MeterReading",
    "namespace": "tests.produce",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "meter_id", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "count", "type": "long"},
        {"name": "ok", "type": "boolean"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "unit", "type": "string", "default": "kwh"},
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
        {"name": "grade", "type": {"type": "enum", "name": "Grade", "symbols": ["a", "b", "c"]}},
        {"name": "raw", "type": ["null", "bytes"], "default": None},
        {"name": "ts", "type": "long"},
    ],
}
SOURCE = Source("meter_readings", METERS, key="meter_id", event_time="ts", topic="meters")
codec.register(SOURCE.name, [METERS])
SCHEMA = codec.schema(SOURCE.name)

GOOD = {
    "reading_id": "r1",
    "meter_id": "m1",
    "value": 1.5,
    "count": 3,
    "ok": True,
    "grade": "b",
    "ts": 1_700_000_000_000,
}
FULL = GOOD | {"note": None, "unit": "kwh", "tags": [], "raw": None}


def _lines(path: Path, fmt: str) -> list[Line]:
    return list(read_file(path, fmt, SCHEMA))


def _jsonl(path: Path, *rows: Any) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- reading files ---------------------------------------------------------------------------------------


def test_jsonl_lines_are_numbered_blank_lines_skipped(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", GOOD, "", "[1, 2]", "{oops", GOOD | {"raw": "\u00ff\u0001"})
    lines = _lines(path, "jsonl")
    assert [(line.number, line.error is None) for line in lines] == [
        (1, True),
        (3, False),
        (4, False),
        (5, True),
    ]
    assert lines[0].record == GOOD
    assert "expected a JSON object, got list" in (lines[1].error or "")
    assert (lines[2].error or "").startswith("not JSON")
    assert lines[3].record is not None and lines[3].record["raw"] == b"\xff\x01"  # Avro JSON's bytes


def test_csv_cells_take_the_schema_types(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        "reading_id,meter_id,value,count,ok,note,unit,tags,grade,ts\n"
        'r1,m1,1.5,3,true,,,"[""x"", ""y""]",b,1700000000000\n'
        "r2,m2,2,4.0,NO,hello,wh,[],c,1700000000001\n"
        '"r3\nspans two lines",m3,-1e3,5,1,,,[],a,1700000000002\n'
        "r4,m4,1.5,3,maybe,,,[],a,1\n"
        "r5,m5,1.5,3.5,true,,,[],a,1\n"
        "r6,m6,,3,true,,,[],a,1\n"
        "r7,m7,1.5\n"
    )
    lines = _lines(path, "csv")
    assert [line.number for line in lines] == [2, 3, 4, 6, 7, 8, 9]
    first, second, third, *bad = lines
    # an empty nullable cell is null, an empty cell of a field with a default takes the default
    assert first.record == {
        "reading_id": "r1",
        "meter_id": "m1",
        "value": 1.5,
        "count": 3,
        "ok": True,
        "note": None,
        "tags": ["x", "y"],
        "grade": "b",
        "ts": 1_700_000_000_000,
    }
    assert second.record is not None
    assert (second.record["count"], second.record["ok"], second.record["unit"]) == (4, False, "wh")
    assert third.record is not None and third.record["reading_id"] == "r3\nspans two lines"
    assert third.record["value"] == -1000.0
    assert [line.error for line in bad] == [
        "field 'ok': expected boolean, got 'maybe'",
        "field 'count': expected long, got '3.5'",
        "field 'value': expected double, got ''",
        "3 cells, the header has 10",
    ]


def test_csv_header_problems_are_line_1(tmp_path: Path) -> None:
    unknown = tmp_path / "u.csv"
    unknown.write_text("reading_id,meter_id,value,count,ok,grade,ts,colour\nr1,m1,1,1,true,a,1,red\n")
    lines = _lines(unknown, "csv")
    assert lines[0].number == 1 and (lines[0].error or "").startswith("unknown column(s) colour")
    assert lines[1].record == {k: v for k, v in GOOD.items() if k != "ts"} | {
        "reading_id": "r1",
        "value": 1.0,
        "count": 1,
        "grade": "a",
        "ts": 1,
    }
    missing = tmp_path / "m.csv"
    missing.write_text("reading_id,meter_id,value\nr1,m1,1\nr2,m2,2\n")
    assert [(line.number, line.error) for line in _lines(missing, "csv")] == [
        (1, "missing column(s) count, ok, grade, ts (fields without a default)")
    ]


def test_avro_container_records_are_numbered(tmp_path: Path) -> None:
    path = tmp_path / "a.avro"
    with path.open("wb") as fh:
        fastavro.writer(
            fh, fastavro.parse_schema(json.loads(json.dumps(METERS))), [FULL, FULL | {"meter_id": "m2"}]
        )
    lines = _lines(path, "avro")
    assert [(line.number, line.record) for line in lines] == [(1, FULL), (2, FULL | {"meter_id": "m2"})]
    broken = tmp_path / "broken.avro"
    broken.write_bytes(path.read_bytes()[:-30])
    assert (_lines(broken, "avro")[-1].error or "").endswith("reading stopped")
    assert (_lines(_jsonl(tmp_path / "x.avro", GOOD), "avro")[0].error or "").startswith("not an Avro")


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(tmp_path / "a.ndjson") == "jsonl"
    assert detect_format(tmp_path / "a.CSV") == "csv"
    assert detect_format(tmp_path / "a.jsonl", "csv") == "csv"
    blob = tmp_path / "data"
    with blob.open("wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(json.loads(json.dumps(METERS))), [FULL])
    assert detect_format(blob) == "avro"
    (tmp_path / "other").write_text("x")
    with pytest.raises(StreamError, match="--format"):
        detect_format(tmp_path / "other")


# -- checking records ------------------------------------------------------------------------------------


def test_encode_fills_defaults_and_keys_by_the_source_key() -> None:
    key, payload = encode_record(SOURCE, GOOD)
    assert key == b"m1"
    assert codec.decode(payload, SOURCE.name) == FULL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value": float("nan")}, "field 'value': nan is not a finite number"),
        ({"value": float("-inf")}, "field 'value': -inf is not a finite number"),
        ({"value": "lots"}, "field 'value': expected double, got str 'lots'"),
        ({"count": 1.5}, "field 'count': expected long"),
        ({"grade": "z"}, "field 'grade'"),
        ({"colour": "red"}, "unknown field(s) colour"),
        ({"ts": None}, "field 'ts': expected long"),
    ],
)
def test_encode_refuses_bad_records(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError) as info:
        encode_record(SOURCE, GOOD | change)
    assert message in str(info.value)


def test_encode_refuses_a_missing_required_field() -> None:
    with pytest.raises(SchemaError, match="field 'ts' is missing"):
        encode_record(SOURCE, {k: v for k, v in GOOD.items() if k != "ts"})


def test_a_file_with_bad_lines_sends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_producer(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a file with bad records must not reach a producer")

    monkeypatch.setattr(produce, "SourceProducer", no_producer)
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(GOOD),
                json.dumps(GOOD | {"value": float("nan")}),  # json writes NaN, which Python reads back
                json.dumps(GOOD),
                json.dumps(GOOD | {"count": "three"}),
            ]
        )
        + "\n"
    )
    heard: list[str] = []
    summary = produce_file(
        CommonSettings(kafka_bootstrap="127.0.0.1:1", topic_prefix="p."),
        SOURCE,
        path,
        on_rejected=lambda r: heard.append(str(r)),
    )
    assert summary["produced"] == 0 and summary["records"] == 4 and summary["rejected_count"] == 2
    assert [r["line"] for r in summary["rejected"]] == [2, 4]
    assert "nan is not a finite number" in summary["rejected"][0]["error"]
    assert "field 'count'" in summary["rejected"][1]["error"]
    assert heard[0].startswith("line 2: ") and heard[1].startswith("line 4: ")
    assert summary["topic"] == "p.meters" and summary["format"] == "jsonl"


def test_progress_is_reported_per_phase(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", GOOD, GOOD | {"value": "x"})
    seen: list[produce.Progress] = []
    produce_file(CommonSettings(), SOURCE, path, on_progress=seen.append, progress_every_s=0)
    assert [(p.phase, p.done, p.rejected) for p in seen] == [("checked", 2, 1)]
    assert str(seen[0]).startswith("produce meter_readings: checked 2 records (1 rejected) in ")


def test_find_source_by_name_or_topic() -> None:
    project = Project("meters", sources={SOURCE.name: SOURCE})
    assert find_source(project, "meter_readings") is SOURCE
    assert find_source(project, "meters") is SOURCE
    with pytest.raises(DefinitionError, match=r"sources: meter_readings \(topic meters\)"):
        find_source(project, "nothing")
