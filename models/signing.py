"""Ed25519 signatures of model versions: publishers sign, serving verifies against its trusted keys.

What is signed is a *statement* about the version, not the artifact bytes alone::

    b"tide.model_version/1\\n" + canonical JSON of {model, version, flavor, sha256, feature_names}

plus ``task`` and ``classes`` when the record is not a plain binary model, ``view_versions`` (its
lineage: the version of each view it was trained with) when the record names any, and ``blessed`` when
the record has a blessing (whether it may serve as champion), so the statements of older versions are
what they always were and an unblessed version cannot be passed off as blessed. The artifact is bound
through its sha256 (checked against the bytes on load), and the statement names the model, version,
flavor, input order, task, class order and lineage, so a signed artifact cannot be replayed as another
model, another version, with its inputs permuted, its outputs given other class names or its features
read from other view versions. The
canonical JSON has sorted keys, no spaces and ASCII only, so every writer produces the same bytes for
the same statement.

A key is identified by ``key_id``: the first 16 hex digits of the SHA-256 of its raw 32-byte public key.
Keys are PEM files: the private key PKCS#8 (unencrypted: protect the file, e.g. a mounted secret), public
keys SubjectPublicKeyInfo; a trusted-keys file may hold several public keys one after another (rotation).
Bad key files raise :class:`ConfigError` (start-up); a version that fails verification raises
:class:`ModelLoadError` (it is refused, the serving model stays).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from infra.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

STATEMENT_PREFIX = b"tide.model_version/1\n"
PRIVATE_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub.pem"
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def statement(record: Mapping[str, Any]) -> bytes:
    """The bytes signed for a ``model_version`` record (see the module docstring)."""
    body = {
        "model": str(record["model"]),
        "version": int(record["version"]),
        "flavor": str(record["flavor"]),
        "sha256": str(record["sha256"]).lower(),
        "feature_names": [str(f) for f in record.get("feature_names") or ()],
    }
    task, classes = str(record.get("task") or "binary"), [str(c) for c in record.get("classes") or ()]
    if task != "binary" or classes:
        body.update(task=task, classes=classes)
    views = record.get("view_versions") or {}
    if views:
        body["view_versions"] = {str(name): int(v) for name, v in views.items()}
    blessing = record.get("blessing")
    if blessing is not None:
        body["blessed"] = bool(blessing.get("blessed"))
    return STATEMENT_PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """A private key that signs model-version statements."""

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def from_key(cls, private_key: Ed25519PrivateKey) -> Signer:
        return cls(private_key, key_id(private_key.public_key()))

    @classmethod
    def from_pem_file(cls, path: Path) -> Signer:
        """Load an unencrypted PKCS#8 Ed25519 private key; ConfigError naming the file otherwise."""
        try:
            data = Path(path).read_bytes()
            mode = Path(path).stat().st_mode
        except OSError as exc:
            raise ConfigError(f"signing key {path}: {exc.strerror or exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"signing key {path}: not an unencrypted PEM private key ({exc})") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"signing key {path}: {type(key).__name__} is not an Ed25519 key")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("signing key %s is readable by other users (mode %o)", path, mode & 0o777)
        return cls.from_key(key)

    def sign(self, record: Mapping[str, Any]) -> tuple[bytes, str]:
        """``(signature, key_id)`` for ``record``'s statement."""
        return self.private_key.sign(statement(record)), self.key_id


class Verifier:
    """Trusted public keys by ``key_id``; checks a record's signature against them."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        if not keys:
            raise ConfigError("a verifier needs at least one trusted public key")
        self.keys = dict(keys)

    @classmethod
    def from_public_keys(cls, *keys: Ed25519PublicKey) -> Verifier:
        return cls({key_id(k): k for k in keys})

    @classmethod
    def from_pem_file(cls, path: Path) -> Verifier:
        """Every Ed25519 ``PUBLIC KEY`` block in ``path``; ConfigError when there is none or one is bad."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"trusted keys {path}: {exc.strerror or exc}") from exc
        keys = []
        for i, block in enumerate(_PEM_PUBLIC.findall(data)):
            try:
                key = serialization.load_pem_public_key(block)
            except ValueError as exc:
                raise ConfigError(f"trusted keys {path}: key {i + 1} does not parse ({exc})") from exc
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"trusted keys {path}: key {i + 1} is {type(key).__name__}, not Ed25519")
            keys.append(key)
        if not keys:
            raise ConfigError(f"trusted keys {path}: no PEM public key in the file")
        return cls.from_public_keys(*keys)

    def verify(self, record: Mapping[str, Any]) -> str:
        """The ``key_id`` that signed ``record``; ModelLoadError if unsigned, by an unknown key, or forged."""
        signature, kid = record.get("signature"), record.get("key_id")
        if not signature:
            raise ModelLoadError("unsigned, and only signed versions are accepted (trusted keys are set)")
        if not isinstance(signature, bytes | bytearray | memoryview):
            raise ModelLoadError(f"signature is {type(signature).__name__}, not bytes")
        key = self.keys.get(str(kid))
        if key is None:
            raise ModelLoadError(
                f"signed by key {kid!r}, which is not trusted (trusted: {sorted(self.keys)})"
            )
        try:
            key.verify(bytes(signature), statement(record))
        except InvalidSignature:
            raise ModelLoadError(f"bad signature (key {kid}): the record is not what was signed") from None
        return str(kid)


def generate_key_pair(out_dir: Path) -> dict[str, str]:
    """Write a new private key (mode 0600) and its public key into ``out_dir``; refuses to overwrite."""
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; keys are never overwritten")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return {
        "private_key": str(private_path),
        "public_key": str(public_path),
        "key_id": key_id(key.public_key()),
    }
