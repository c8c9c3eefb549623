"""Model artifacts by URI: a local directory store for publishers, bounded fetches for serving.

A ``model_version`` record carries its artifact inline or names it by ``artifact_uri``; either way its
``sha256`` is the digest of the exact bytes, so whatever a URI returns is checked before it is used.

- :class:`LocalArtifactStore` writes content-addressed files (``<root>/<model>/<sha256>.<flavor>``) and
  returns their ``file://`` URI. Writes are atomic (temporary file, then rename) and idempotent, so a
  publish retried after an aborted Kafka transaction rewrites the same file.
- :func:`fetch` reads ``file://``, ``http://`` and ``https://`` URIs within a time budget and a size bound,
  and :func:`fetch_verified` also checks the digest. Failures raise :class:`ModelLoadError`: the only
  caller that fetches is model loading, where a bad artifact must never replace a good model.
- :func:`dump_river` and :func:`load_river`: the ``river`` flavor's artifact, a pickle of the learner.
  Every digest is checked by :func:`check_digest`, so a mismatch is raised the same way wherever an
  artifact is loaded.

Other schemes (``s3://``, ``gs://``) are refused with a clear error; an object store is reachable over
``https://`` (a presigned URL). Messages name URIs without their query string, which may hold credentials.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from infra.errors import DigestMismatch, ModelLoadError, TrainingError

logger = logging.getLogger(__name__)

SCHEMES = ("file", "http", "https")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_MAX_REDIRECTS = 3


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def check_digest(blob: bytes, sha256: str) -> None:
    """Raise :class:`DigestMismatch` unless ``blob``'s SHA-256 is ``sha256`` (hex, any case)."""
    digest = sha256_hex(blob)
    if digest != str(sha256).lower():
        raise DigestMismatch(
            f"artifact digest {digest[:16]}... does not match its sha256 {str(sha256)[:16]}..."
        )


def dump_river(learner: Any) -> tuple[bytes, str]:
    """A river learner (or any picklable model) as a ``river`` artifact: ``(bytes, sha256 hex)``."""
    blob = pickle.dumps(learner, protocol=pickle.HIGHEST_PROTOCOL)
    return blob, sha256_hex(blob)


def load_river(blob: bytes, sha256: str) -> Any:
    """The learner of a ``river`` artifact, after checking its digest. Raises :class:`ModelLoadError`.

    Artifacts are pickles: load them only from a models topic that only trusted trainers can write to
    (and sign versions: ``TIDE_SERVE_TRUSTED_KEYS_FILE``). The functions a pickled pipeline refers to
    are imported by module name: the project's code must be on the path (``infra.imports.add_code_path``).
    """
    check_digest(blob, sha256)
    try:
        return pickle.loads(blob)
    except Exception as exc:
        raise ModelLoadError(f"artifact does not unpickle: {type(exc).__name__}: {exc}") from exc


def redact(uri: str) -> str:
    """``uri`` without user info, query or fragment: safe to log."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class LocalArtifactStore:
    """Content-addressed artifact files under ``root``; every process that loads them must see ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path_of(self, model: str, sha256: str, flavor: str) -> Path:
        return self.root / model / f"{sha256}.{flavor}"

    def put(self, model: str, flavor: str, blob: bytes) -> str:
        """Store ``blob`` (idempotent) and return its ``file://`` URI."""
        digest = sha256_hex(blob)
        path = self.path_of(model, digest, flavor)
        if path.is_file() and path.stat().st_size == len(blob):
            return path.as_uri()  # content-addressed: the same name holds the same bytes
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(blob)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a serving process of another user
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise TrainingError(f"cannot store artifact under {self.root}: {exc}") from exc
        logger.info("stored artifact %s (%d bytes)", path, len(blob))
        return path.as_uri()


def fetch(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes at ``uri`` (``file``, ``http``, ``https``), read within ``timeout_s`` and ``max_bytes``."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in SCHEMES:
        raise ModelLoadError(
            f"artifact URI {redact(uri)!r}: unsupported scheme {scheme!r} (supported: {', '.join(SCHEMES)})"
        )
    if scheme == "file":
        return _fetch_file(uri, max_bytes)
    return _fetch_http(uri, timeout_s, max_bytes)


def fetch_verified(
    uri: str, sha256: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """:func:`fetch`, then check the bytes against ``sha256`` (hex)."""
    blob = fetch(uri, timeout_s=timeout_s, max_bytes=max_bytes)
    try:
        check_digest(blob, sha256)
    except ModelLoadError as exc:
        raise ModelLoadError(f"artifact at {redact(uri)!r}: {exc}") from None
    return blob


def record_artifact(
    record: Mapping[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The checked artifact bytes of a ``model_version`` record: inline, else fetched from its URI."""
    sha256 = str(record.get("sha256") or "").lower()
    inline, uri = record.get("artifact"), record.get("artifact_uri")
    if inline:
        blob = bytes(inline)
        check_digest(blob, sha256)
        return blob
    if not uri:
        raise ModelLoadError("the record has neither an inline artifact nor an artifact_uri")
    try:
        return fetch_verified(str(uri), sha256, timeout_s=timeout_s, max_bytes=max_bytes)
    except ModelLoadError as exc:
        raise ModelLoadError(f"artifact URI {redact(str(uri))!r}: {exc}") from exc


def _fetch_file(uri: str, max_bytes: int) -> bytes:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ModelLoadError(f"artifact URI {redact(uri)!r}: file URIs name no remote host")
    path = Path(unquote(parts.path))
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise ModelLoadError(f"artifact {path}: {size} bytes is over the limit of {max_bytes}")
            blob = fh.read(max_bytes + 1)  # the file may have grown since fstat
    except OSError as exc:
        raise ModelLoadError(f"artifact {path}: {exc.strerror or exc}") from exc
    if len(blob) > max_bytes:
        raise ModelLoadError(f"artifact {path}: more than the limit of {max_bytes} bytes")
    return blob


def _fetch_http(uri: str, timeout_s: float, max_bytes: int) -> bytes:
    where = redact(uri)
    # httpx's timeouts bound each connect and read; the deadline bounds the whole transfer, so a server
    # that drips one byte per read timeout cannot hold a loader for longer than timeout_s.
    deadline = time.monotonic() + timeout_s
    try:
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=_MAX_REDIRECTS) as client,
            client.stream("GET", uri) as response,
        ):
            if response.status_code != 200:
                raise ModelLoadError(f"artifact {where}: HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ModelLoadError(f"artifact {where}: {declared} bytes is over the limit of {max_bytes}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():  # as received: a size would buffer past the deadline
                size += len(chunk)
                if size > max_bytes:
                    raise ModelLoadError(f"artifact {where}: more than the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ModelLoadError(f"artifact {where}: not fetched within {timeout_s} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException as exc:
        raise ModelLoadError(f"artifact {where}: not fetched within {timeout_s} s") from exc
    except httpx.HTTPError as exc:
        raise ModelLoadError(f"artifact {where}: {type(exc).__name__}: {exc}") from exc
