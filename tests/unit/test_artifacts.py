"""Artifacts by URI (store, bounded fetch), signing keys and statements, and the model-version publisher."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from infra.errors import ConfigError, ModelLoadError
from infra.settings import CommonSettings
from models.artifacts import LocalArtifactStore, fetch, fetch_verified, record_artifact, redact
from models.signing import Signer, Verifier, generate_key_pair, statement
from online_training.publish import build_record, publish_model_version
from online_training.settings import PublishSettings
from schemas import codec

BLOB = bytes(range(256)) * 40  # 10 KiB


# --- the local store --------------------------------------------------------------------------------------


def test_store_is_content_addressed_atomic_and_idempotent(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    uri = store.put("fraud-nn", "onnx", BLOB)
    digest = hashlib.sha256(BLOB).hexdigest()
    assert uri == (tmp_path / "artifacts" / "fraud-nn" / f"{digest}.onnx").resolve().as_uri()
    assert store.put("fraud-nn", "onnx", BLOB) == uri
    assert fetch_verified(uri, digest) == BLOB
    assert [p.name for p in (tmp_path / "artifacts" / "fraud-nn").iterdir()] == [f"{digest}.onnx"]
    assert os.stat(store.path_of("fraud-nn", digest, "onnx")).st_mode & 0o777 == 0o644


def test_file_fetch_checks_digest_size_and_existence(tmp_path: Path) -> None:
    path = tmp_path / "a b.bin"  # a space: the URI is percent-encoded
    path.write_bytes(BLOB)
    uri = path.as_uri()
    assert "%20" in uri and fetch(uri) == BLOB
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        fetch_verified(uri, "0" * 64)
    with pytest.raises(ModelLoadError, match="over the limit of 100"):
        fetch(uri, max_bytes=100)
    with pytest.raises(ModelLoadError, match="No such file"):
        fetch((tmp_path / "missing").as_uri())
    with pytest.raises(ModelLoadError, match="no remote host"):
        fetch("file://otherhost/etc/passwd")
    with pytest.raises(ModelLoadError, match="unsupported scheme 'gs'"):
        fetch("gs://bucket/x")


def test_record_artifact_prefers_inline_and_checks_either(tmp_path: Path) -> None:
    digest = hashlib.sha256(BLOB).hexdigest()
    assert record_artifact({"artifact": BLOB, "sha256": digest}) == BLOB
    with pytest.raises(ModelLoadError, match="digest"):
        record_artifact({"artifact": BLOB + b"x", "sha256": digest})
    path = tmp_path / "x"
    path.write_bytes(BLOB)
    assert record_artifact({"artifact": b"", "artifact_uri": path.as_uri(), "sha256": digest}) == BLOB


def test_redact_drops_credentials_and_query() -> None:
    assert (
        redact("https://user:secret@store.example:8443/m/1.onnx?X-Amz-Signature=abc#f")
        == "https://store.example:8443/m/1.onnx"
    )


# --- HTTP fetches against a real local server -------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/ok"):
            self._send(200, BLOB)
        elif self.path.startswith("/chunked"):  # no Content-Length: the size is only known by reading
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(4):
                chunk = BLOB
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/slow"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            for i in range(0, len(BLOB), 1024):  # each read is quick, the whole is slow
                self.wfile.write(BLOB[i : i + 1024])
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.end_headers()
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_fetch(server: str) -> None:
    digest = hashlib.sha256(BLOB).hexdigest()
    assert fetch_verified(f"{server}/ok?token=secret", digest) == BLOB
    assert fetch(f"{server}/redirect") == BLOB
    assert fetch(f"{server}/chunked") == BLOB * 4
    with pytest.raises(ModelLoadError, match="HTTP 404"):
        fetch(f"{server}/missing")
    with pytest.raises(ModelLoadError, match="over the limit") as info:
        fetch(f"{server}/ok?token=secret", max_bytes=100)
    assert "secret" not in str(info.value)
    with pytest.raises(ModelLoadError, match="more than the limit"):
        fetch(f"{server}/chunked", max_bytes=len(BLOB) * 2)


def test_http_fetch_is_bounded_in_time_as_a_whole(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"not fetched within 0\.3 s"):
        fetch(f"{server}/slow", timeout_s=0.3)
    assert time.monotonic() - started < 1.0
    with pytest.raises(ModelLoadError, match="ConnectError"):
        fetch("http://127.0.0.1:9/x", timeout_s=1)  # the discard port: nothing listens


# --- signing ----------------------------------------------------------------------------------------------


def test_statement_is_canonical_and_names_what_is_bound() -> None:
    rec = {"model": "m", "version": 3, "flavor": "onnx", "sha256": "AB", "feature_names": ["a", "b"], "x": 1}
    assert statement(rec) == (
        b'tide.model_version/1\n{"feature_names":["a","b"],"flavor":"onnx","model":"m","sha256":"ab",'
        b'"version":3}'
    )
    # a binary record's statement is what it always was; other tasks bind their task and class order
    assert statement({**rec, "task": "binary", "classes": []}) == statement(rec)
    multi = {**rec, "task": "multiclass", "classes": ["b", "a"]}
    assert statement(multi).endswith(
        b'"task":"multiclass","version":3}'
    ) and b'"classes":["b","a"]' in statement(multi)
    assert statement(multi) != statement({**multi, "classes": ["a", "b"]})
    # a lineage binds the view versions read; a record without one states what it always did
    assert statement({**rec, "view_versions": {}}) == statement(rec)
    lineage = {**rec, "view_versions": {"b_view": 2, "a_view": 1}}
    assert b'"view_versions":{"a_view":1,"b_view":2}' in statement(lineage)
    assert statement(lineage) != statement({**lineage, "view_versions": {"b_view": 1, "a_view": 1}})


def test_key_files_round_trip_and_refuse_overwrite(tmp_path: Path) -> None:
    keys = generate_key_pair(tmp_path / "k")
    assert os.stat(keys["private_key"]).st_mode & 0o777 == 0o600
    signer = Signer.from_pem_file(Path(keys["private_key"]))
    verifier = Verifier.from_pem_file(Path(keys["public_key"]))
    assert signer.key_id == keys["key_id"] and list(verifier.keys) == [keys["key_id"]]
    rec = {"model": "m", "version": 1, "flavor": "onnx", "sha256": "00", "feature_names": []}
    signature, kid = signer.sign(rec)
    assert verifier.verify({**rec, "signature": signature, "key_id": kid}) == kid
    with pytest.raises(ConfigError, match="never overwritten"):
        generate_key_pair(tmp_path / "k")


def test_a_trusted_keys_file_may_hold_several_keys(tmp_path: Path) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pem = b"".join(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for k in (a, b)
    )
    (tmp_path / "trusted.pem").write_bytes(b"# rotation: old key, then new\n" + pem)
    verifier = Verifier.from_pem_file(tmp_path / "trusted.pem")
    rec = {"model": "m", "version": 1, "flavor": "onnx", "sha256": "00", "feature_names": []}
    for key in (a, b):
        signature, kid = Signer.from_key(key).sign(rec)
        assert verifier.verify({**rec, "signature": signature, "key_id": kid}) == kid


def test_bad_key_files_are_config_errors(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "rsa.pub.pem").write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "empty.pem").write_text("nothing here\n")
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        Signer.from_pem_file(tmp_path / "rsa.pem")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        Signer.from_pem_file(tmp_path / "empty.pem")
    with pytest.raises(ConfigError, match="not Ed25519"):
        Verifier.from_pem_file(tmp_path / "rsa.pub.pem")
    with pytest.raises(ConfigError, match="no PEM public key"):
        Verifier.from_pem_file(tmp_path / "empty.pem")
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        Signer.from_pem_file(tmp_path / "missing.pem")


# --- the publisher ----------------------------------------------------------------------------------------


class Collect:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic_name: str, key: bytes = b"", value: bytes = b"", **_: Any) -> None:
        self.records.append((topic_name, key, value))


def publish_args(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": "fraud-nn",
        "version": 4,
        "flavor": "onnx",
        "artifact": BLOB,
        "feature_names": ("amount", "card_present"),
        "metric_name": "roc_auc_held_out",
        "metric_value": 0.93,
        "trained_on": 1200,
    }
    args.update(overrides)
    return args


def test_publish_inline_under_the_threshold_into_the_given_producer(tmp_path: Path) -> None:
    settings = PublishSettings(state_dir=tmp_path, topic_prefix="p.")  # type: ignore[arg-type]
    out = Collect()
    record = publish_model_version(settings, **publish_args(), producer=out)  # type: ignore[arg-type]
    ((topic_name, key, value),) = out.records
    assert (topic_name, key) == ("p.models", b"fraud-nn")
    decoded = codec.decode(value, expected="model_version")
    # what the record does not set decodes to the schema's defaults (a binary model, no classes)
    lineage = {"parent_version": None, "trigger": None, "data": None, "blessing": None}
    assert decoded == {"task": "binary", "classes": [], "definitions_digest": None, **lineage, **record}
    assert decoded["view_versions"] == {}  # no lineage given
    assert decoded["artifact"] == BLOB and decoded["artifact_uri"] is None
    assert decoded["sha256"] == hashlib.sha256(BLOB).hexdigest()
    assert decoded["feature_names"] == ["amount", "card_present"] and decoded["signature"] is None
    assert not (tmp_path / "artifacts").exists()


def test_publish_by_uri_over_the_threshold_and_signed(tmp_path: Path) -> None:
    keys = generate_key_pair(tmp_path / "keys")
    settings = PublishSettings(
        state_dir=tmp_path,  # type: ignore[arg-type]
        artifact_inline_max_bytes=1024,
        signing_key_file=keys["private_key"],
    )
    lineage = {"definitions_digest": "d" * 64, "view_versions": {"card_1h": 2}}
    record = build_record(settings, **publish_args(**lineage))
    assert {k: record[k] for k in lineage} == lineage
    assert record["artifact"] == b"" and record["artifact_uri"].startswith("file://")
    assert record_artifact(record) == BLOB
    assert record["key_id"] == keys["key_id"]
    verifier = Verifier.from_pem_file(Path(keys["public_key"]))
    assert verifier.verify(codec.decode(codec.encode("model_version", record))) == keys["key_id"]
    with pytest.raises(ModelLoadError, match="bad signature"):  # its lineage is signed
        verifier.verify({**record, "view_versions": {"card_1h": 1}})
    explicit = PublishSettings(
        state_dir=tmp_path, artifact_inline_max_bytes=0, artifact_store=str(tmp_path / "s")
    )  # type: ignore[arg-type]
    assert build_record(explicit, **publish_args())["artifact_uri"].startswith((tmp_path / "s").as_uri())


def test_plain_common_settings_publish_with_the_defaults(tmp_path: Path) -> None:
    record = build_record(CommonSettings(state_dir=tmp_path), **publish_args())  # type: ignore[arg-type]
    assert record["artifact"] == BLOB and record["signature"] is None
    big = bytes(PublishSettings.model_fields["artifact_inline_max_bytes"].default + 1)
    by_uri = build_record(CommonSettings(state_dir=tmp_path), **publish_args(artifact=big))  # type: ignore[arg-type]
    assert by_uri["artifact_uri"] == (tmp_path / "artifacts" / "fraud-nn").resolve().as_uri() + (
        f"/{hashlib.sha256(big).hexdigest()}.onnx"
    )
