"""Avro schemas: round trips, version history, pinned fingerprints, validation and decoding errors."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, cast, get_type_hints

import fastavro
import pytest

from infra.errors import SchemaError, UnknownSchemaError
from schemas import codec, codegen, records

# Two source schemas registered the way a project's sources are (schemas.registry.register_schemas).
EVENT_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Event",
    "namespace": "test",
    "doc": "A test record.",
    "fields": [
        {"name": "event_id", "type": "string", "doc": "A field."},
        {"name": "seq", "type": ["null", "long"], "default": None, "doc": "A field."},
        {"name": "entity_id", "type": "string", "doc": "A field."},
        {"name": "site_id", "type": "string", "doc": "A field."},
        {"name": "kind", "type": "string", "doc": "A field."},
        {"name": "amount", "type": "double", "doc": "A field."},
        {"name": "region", "type": "string", "doc": "A field."},
        {"name": "present", "type": "boolean", "doc": "A field."},
        {"name": "ts", "type": "long", "doc": "A field."},
    ],
}
LABEL_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Label",
    "namespace": "test",
    "doc": "A test record.",
    "fields": [
        {"name": "event_id", "type": "string", "doc": "A field."},
        {"name": "entity_id", "type": "string", "doc": "A field."},
        {"name": "positive", "type": "boolean", "doc": "A field."},
        {"name": "event_ts", "type": "long", "doc": "A field."},
        {"name": "ts", "type": "long", "doc": "A field."},
    ],
}
codec.register("event", [EVENT_SCHEMA])
codec.register("label", [LABEL_SCHEMA])

ARTIFACT = b"\x80\x04\x95 pickled river model \x00\xff" * 8

REALISTIC: dict[str, dict[str, Any]] = {
    "event": {
        "event_id": "evt-000042",
        "seq": 42,
        "entity_id": "e-0007",
        "site_id": "m-113",
        "kind": "electronics",
        "amount": 249.99,
        "region": "DE",
        "present": False,
        "ts": 1_718_000_000_123,
    },
    "label": {
        "event_id": "evt-000042",
        "entity_id": "e-0007",
        "positive": True,
        "event_ts": 1_718_000_000_123,
        "ts": 1_718_000_900_000,
    },
    "prediction": {
        "request_id": "req-9f2c",
        "event_id": "evt-000042",
        "entities": {"entity_id": "e-0007"},
        "model": "scorer",
        "version": 3,
        "arm": "canary",
        "features": {
            "amount": 249.99,
            "txn_count_1h": 3.0,
            "region": "DE",
            "present": False,
            "avg_amount_24h": None,
        },
        "score": 0.8125,
        "label": None,
        "probabilities": None,
        "latency_ms": 1.7,
        "ts": 1_718_000_000_140,
    },
    "model_version": {
        "model": "scorer",
        "version": 3,
        "flavor": "river",
        "task": "binary",
        "classes": [],
        "artifact": ARTIFACT,
        "artifact_uri": None,
        "sha256": hashlib.sha256(ARTIFACT).hexdigest(),
        "feature_names": ["amount", "txn_count_1h", "present"],
        "metric_name": "roc_auc",
        "metric_value": 0.91,
        "trained_on": 12_000,
        "reference": {
            "size": 12_000,
            "features": [
                {"name": "amount", "edges": [0.0, 10.0, 100.0, 1000.0], "counts": [4000, 6500, 1500]},
                {"name": "txn_count_1h", "edges": [0.0, 1.0, 5.0], "counts": [9000, 3000]},
            ],
            "prediction": {"name": "prediction", "edges": [0.0, 0.5, 1.0], "counts": [11_800, 200]},
            "categories": [{"name": "site", "values": ["north", "south"], "counts": [7000, 5000]}],  # v5
        },
        "created_ts": 1_718_000_000_000,
        "signature": bytes(range(64)),  # v2: an Ed25519 signature is 64 bytes
        "key_id": "0123456789abcdef",
        "definitions_digest": None,
        "view_versions": {"sensor_recent": 4},  # v4: the view versions it was trained with
        "parent_version": 2,  # v5: lineage, data and blessing
        "trigger": "concept drift alert alert-7",
        "data": {"first_ts": 1_717_000_000_000, "last_ts": 1_718_000_000_000, "offsets": {"readings:0": 812}},
        "blessing": {
            "blessed": True,
            "reason": "roc_auc 0.91 >= champion 0.88 - 0.01",
            "metric": "roc_auc",
            "candidate_value": 0.91,
            "baseline_value": 0.88,
            "baseline_version": 2,
            "window_labels": 2000,
        },
    },
    "deployment": {
        "model": "scorer",
        "action": "canary",
        "version": 3,
        "weight": 0.1,
        "reason": "roc_auc 0.91 > champion 0.88",
        "id": "dep-1",  # v2: id and source
        "source": "judge",
        "ts": 1_718_000_000_500,
    },
    "definitions": {
        "project": "scorer",
        "version": 2,
        "digest": "ab" * 32,
        "body": '{"project": "scorer"}',
        "applied_by": "ops@host",
        "ts": 1_718_000_000_000,
    },
    "drift_alert": {
        "alert_id": "alert-1",
        "model": "scorer",
        "version": 3,
        "feature": "amount",
        "statistic": "psi",
        "value": 0.31,
        "threshold": 0.2,
        "window_size": 1000,
        "reference_size": 12_000,
        "trigger_event_id": "evt-000042",
        "kind": "input",  # v2: kind, type, p-value, calibration, estimates, delay, arm
        "feature_type": "numeric",
        "p_value": 0.0001,
        "false_alarm_rate": 0.00001,
        "estimate_before": 12.5,
        "estimate_after": 31.0,
        "delay_records": 240,
        "arm": "champion",
        "ts": 1_718_000_001_000,
    },
    "canary_verdict": {
        "verdict_id": "verdict-1",
        "model": "scorer",
        "version": 4,
        "champion_version": 3,
        "arm": "canary",
        "outcome": "pass",
        "rule": "non_inferiority",
        "metric": "log_loss",
        "estimate": -0.01,
        "lower": -0.03,
        "upper": 0.004,
        "margin": 0.01,
        "alpha": 0.05,
        "n": 1800,
        "n_champion": 16_000,
        "duration_ms": 120_000,
        "guardrails": {"error_rate": 0.0, "latency_p99_ms": 4.2},
        "action": "promote",
        "final": True,
        "ts": 1_718_000_002_000,
    },
    "checkpoint": {
        "processor": "tide-judge",
        "positions": [{"topic": "tide.predictions", "partition": 0, "offset": 4410}],
        "state": b"state",
        "ts": 1_718_000_003_000,
    },
}


def single_object(parsed: dict[str, Any], datum: Any) -> bytes:
    """Single-object-encode ``datum`` with any parsed schema, bypassing the codec's current version."""
    buf = io.BytesIO()
    buf.write(codec.MAGIC + codec.schema_fingerprint(parsed))
    fastavro.schemaless_writer(buf, parsed, datum)
    return buf.getvalue()


# --- (a) round trips -------------------------------------------------------------------------------------


def test_record_names_match_schema_directories() -> None:
    dirs = {p.name for p in codec.AVRO_DIR.iterdir() if p.is_dir()}
    assert dirs == set(codec.RECORD_NAMES) == set(REALISTIC) - {"event", "label"}


@pytest.mark.parametrize("name", codec.RECORD_NAMES)
def test_round_trip(name: str) -> None:
    payload = codec.encode(name, REALISTIC[name])
    assert payload[:2] == b"\xc3\x01"
    assert payload[2:10] == codec.fingerprint(name)
    assert codec.record_name(payload) == name
    assert codec.decode(payload, expected=name) == REALISTIC[name]
    assert codec.decode(bytearray(payload)) == codec.decode(memoryview(payload)) == REALISTIC[name]


def test_defaults_are_filled_in_and_ints_come_back_as_ints() -> None:
    decoded = codec.decode(codec.encode("deployment", {"model": "scorer", "action": "rollback", "ts": 5}))
    assert decoded == {
        "model": "scorer",
        "action": "rollback",
        "version": None,
        "weight": 0.0,
        "reason": None,
        "id": None,
        "source": None,
        "ts": 5,
    }
    assert type(decoded["ts"]) is int
    event = codec.decode(codec.encode("event", {k: v for k, v in REALISTIC["event"].items() if k != "seq"}))
    assert event["seq"] is None


@pytest.mark.parametrize("name", codec.RECORD_NAMES)
@pytest.mark.parametrize("variant", range(4))
def test_sample_datums_round_trip(name: str, variant: int) -> None:
    datum = codec.sample_datum(codec.schema(name), variant)
    assert codec.decode(codec.encode(name, datum)) == datum


def test_sample_datum_covers_every_union_branch() -> None:
    values = {type(codec.sample_datum(codec.schema("prediction"), v)["features"]["key"]) for v in range(5)}
    assert values == {type(None), bool, int, float, str}


def test_fingerprint_matches_the_avro_spec_byte_order() -> None:
    # The Avro spec's test vector for "int" is 8247732601305521295, written little-endian in headers.
    spec_value = (8247732601305521295).to_bytes(8, "little")
    assert codec.schema_fingerprint(fastavro.parse_schema("int")) == spec_value


# --- (b) backward compatibility --------------------------------------------------------------------------


def test_every_version_is_readable_by_the_current_one() -> None:
    assert codec.check_compatibility() == []
    for name in codec.RECORD_NAMES:
        current_fields = [f["name"] for f in codec.schema(name)["fields"]]
        for version in codec.versions(name):
            for variant in range(4):
                datum = codec.sample_datum(codec.schema(name, version), variant)
                decoded = codec.decode(single_object(codec.schema(name, version), datum), expected=name)
                assert sorted(decoded) == sorted(current_fields), (name, version)


def _history(tmp_path: Path, *new_versions: tuple[int, dict[str, Any]]) -> Path:
    """A copy of the event schema history with extra versions ``(N, schema JSON)`` added."""
    (tmp_path / "event").mkdir()
    (tmp_path / "event" / "v1.avsc").write_text(json.dumps(EVENT_SCHEMA), encoding="utf-8")
    for version, body in new_versions:
        (tmp_path / "event" / f"v{version}.avsc").write_text(json.dumps(body), encoding="utf-8")
    return tmp_path


def _event_v1() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(json.dumps(EVENT_SCHEMA)))


def test_checker_accepts_compatible_changes(tmp_path: Path) -> None:
    v2 = _event_v1()
    v2["fields"] = [f for f in v2["fields"] if f["name"] != "region"]  # removing a field is fine
    v2["fields"].append({"name": "mcc", "type": ["null", "string"], "default": None, "doc": "MCC."})
    assert codec.check_compatibility(_history(tmp_path, (2, v2))) == []


def test_checker_follows_avro_type_promotion() -> None:
    def record(kind: str) -> dict[str, Any]:
        return cast(
            dict[str, Any],
            fastavro.parse_schema(
                {"type": "record", "name": "tide.R", "fields": [{"name": "n", "type": kind}]}
            ),
        )

    assert codec.compatibility_problems(record("int"), record("long")) == []
    assert codec.compatibility_problems(record("long"), record("double")) == []
    assert codec.compatibility_problems(record("long"), record("int"))


def test_checker_rejects_a_new_field_without_default(tmp_path: Path) -> None:
    v2 = _event_v1()
    v2["fields"].append({"name": "mcc", "type": "string", "doc": "MCC."})
    problems = codec.check_compatibility(_history(tmp_path, (2, v2)))
    assert problems and all(p.startswith("event v1 -> v2") for p in problems)
    assert "mcc" in problems[0]


def test_checker_rejects_a_changed_type(tmp_path: Path) -> None:
    v2 = _event_v1()
    next(f for f in v2["fields"] if f["name"] == "amount")["type"] = "string"
    assert codec.check_compatibility(_history(tmp_path, (2, v2)))


def test_checker_exercises_non_null_union_branches(tmp_path: Path) -> None:
    v2 = _event_v1()
    next(f for f in v2["fields"] if f["name"] == "seq")["type"] = ["null", "string"]  # null still reads
    assert codec.check_compatibility(_history(tmp_path, (2, v2)))


def test_checker_rejects_gaps_in_the_history(tmp_path: Path) -> None:
    problems = codec.check_compatibility(_history(tmp_path, (3, _event_v1())))
    assert any("without gaps" in p for p in problems)


# --- (c) released versions are pinned -------------------------------------------------------------------


def test_released_versions_match_their_pinned_fingerprints() -> None:
    pinned, actual = codegen.load_pins(), codegen.current_pins()
    for name, by_version in pinned.items():
        for version, pin in by_version.items():
            assert name in actual and version in actual[name], f"{name} v{version} was deleted"
            assert actual[name][version] == pin, f"released schema {name} v{version} was edited"
    for name, by_version in actual.items():
        for version in by_version:
            assert version in pinned.get(name, {}), (
                f"{name} v{version} is not pinned: python -m schemas.codegen --pin"
            )
    for name in codec.RECORD_NAMES:
        assert pinned[name][str(codec.versions(name)[-1])]["fingerprint"] == codec.fingerprint(name).hex()


def test_an_edit_to_a_released_schema_changes_its_pins(tmp_path: Path) -> None:
    edited = json.loads((codec.AVRO_DIR / "deployment" / "v1.avsc").read_text(encoding="utf-8"))
    edited["fields"][0]["doc"] = "Edited."
    path = tmp_path / "v1.avsc"
    path.write_text(json.dumps(edited), encoding="utf-8")
    assert codegen.content_sha256(path) != codegen.load_pins()["deployment"]["1"]["content_sha256"]
    edited["fields"][0]["type"] = "bytes"
    assert (
        codec.schema_fingerprint(fastavro.parse_schema(edited)).hex()
        != codegen.load_pins()["deployment"]["1"]["fingerprint"]
    )


# --- (d) invalid records --------------------------------------------------------------------------------


def _with(name: str, **changes: Any) -> dict[str, Any]:
    return {**REALISTIC[name], **changes}


def _without(name: str, field: str) -> dict[str, Any]:
    return {k: v for k, v in REALISTIC[name].items() if k != field}


# (record type, record, field named in the error, also caught by the writer alone with validate=False)
INVALID = [
    ("event", _without("event", "entity_id"), "entity_id", True),
    ("event", _with("event", amount="12.50"), "amount", False),
    ("event", _with("event", present="yes"), "present", False),
    ("event", _with("event", seq=True), "seq", True),
    ("event", _with("event", ts=2**64), "ts", True),
    ("label", _with("label", positive=None), "positive", False),
    ("prediction", _with("prediction", features={"amount": [1.0]}), "features['amount']", True),
    ("prediction", _with("prediction", version=2**40), "version", False),
    ("model_version", _with("model_version", artifact="not bytes"), "artifact", True),
    (
        "model_version",
        _with(
            "model_version",
            reference={**REALISTIC["model_version"]["reference"], "features": [{"name": "a"}]},
        ),
        "reference.features[0].edges",
        True,
    ),
    ("deployment", _with("deployment", weight=None), "weight", True),
    ("drift_alert", _with("drift_alert", window_size=1.5), "window_size", False),
]


INVALID_CASES = [(*case[:3], True) for case in INVALID] + [(*case[:3], False) for case in INVALID if case[3]]


@pytest.mark.parametrize(("name", "record", "field", "validate"), INVALID_CASES)
def test_invalid_records_raise_schema_error_naming_the_field(
    name: str, record: dict[str, Any], field: str, validate: bool
) -> None:
    with pytest.raises(SchemaError, match="field") as info:
        codec.encode(name, record, validate=validate)
    assert repr(field) in str(info.value) or f'"{field}"' in str(info.value)
    assert name in str(info.value)


def test_without_validation_the_writer_coerces_silently() -> None:
    # Documents why validate=True is the default: fastavro's writer casts rather than checks.
    unchecked = codec.decode(
        codec.encode("drift_alert", _with("drift_alert", window_size=1.5), validate=False)
    )
    assert unchecked["window_size"] == 1
    unchecked = codec.decode(codec.encode("label", _with("label", positive=None), validate=False))
    assert unchecked["positive"] is False


def test_unknown_fields_and_non_mappings_are_rejected_when_validating() -> None:
    with pytest.raises(SchemaError, match="amout"):
        codec.encode("event", _with("event", amout=1.0))
    with pytest.raises(SchemaError, match="mapping"):
        codec.encode("event", [("event_id", "x")])  # type: ignore[arg-type]


def test_unknown_record_types_and_versions() -> None:
    for call in (
        lambda: codec.encode("evnt", {}),
        lambda: codec.schema("evnt"),
        lambda: codec.versions("evnt"),
    ):
        with pytest.raises(SchemaError, match="evnt"):
            call()
    with pytest.raises(SchemaError, match="no version 99"):
        codec.fingerprint("event", 99)


# --- (e) undecodable payloads ---------------------------------------------------------------------------


def test_garbage_is_a_schema_error() -> None:
    rng = random.Random(7)
    for size in (0, 1, 9, 10, 64, 4096):
        with pytest.raises(SchemaError):
            codec.decode(bytes(rng.getrandbits(8) for _ in range(size)))
    with pytest.raises(SchemaError, match="not an Avro single-object"):
        codec.decode(b"\x00\x01" + codec.encode("event", REALISTIC["event"])[2:])


def test_unknown_fingerprint_is_an_unknown_schema_error() -> None:
    payload = codec.encode("event", REALISTIC["event"])
    forged = payload[:2] + bytes(8) + payload[10:]
    for call in (codec.decode, codec.record_name):
        with pytest.raises(UnknownSchemaError, match="0000000000000000"):
            call(forged)


def test_truncated_and_padded_payloads_are_schema_errors() -> None:
    payload = codec.encode("model_version", REALISTIC["model_version"])
    for cut in (11, 20, len(payload) // 2, len(payload) - 1):
        with pytest.raises(SchemaError, match="cannot decode model_version") as info:
            codec.decode(payload[:cut])
        assert not isinstance(info.value, UnknownSchemaError)
    with pytest.raises(SchemaError, match="trailing"):
        codec.decode(payload + b"\x00")


def test_expected_type_mismatch_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="expected a label record, got event"):
        codec.decode(codec.encode("event", REALISTIC["event"]), expected="label")


# --- (f) generated TypedDicts ---------------------------------------------------------------------------


def test_records_py_is_up_to_date() -> None:
    expected = codegen.render()
    assert codegen.RECORDS_PATH.read_text(encoding="utf-8") == expected, "run python -m schemas.codegen"
    assert codegen.main(["--check"]) == 0


def test_typeddicts_match_the_schemas() -> None:
    assert list(records.RECORD_TYPES) == list(codec.RECORD_NAMES)
    for name, cls in records.RECORD_TYPES.items():
        fields = codec.schema(name)["fields"]
        assert list(get_type_hints(cls)) == [f["name"] for f in fields]
        assert cls.__required_keys__ == {f["name"] for f in fields if "default" not in f}  # type: ignore[attr-defined]
    hints = get_type_hints(records.ModelVersion)
    assert hints["reference"] == records.ReferenceProfile | None
    assert get_type_hints(records.ReferenceProfile)["features"] == list[records.Histogram]
