"""Settings of the scoring service (``TIDE_SERVE_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from infra.settings import CommonSettings
from models.runtime import LoadPolicy
from models.signing import Verifier
from serving.auth import ApiKey


class ServeSettings(CommonSettings):
    # API keys, hashed: a JSON list of {"name", "sha256", "roles": ["score"|"admin", ...]} (`tide keys new`),
    # and/or a file holding the same JSON. None configured: auth is off (warned at start-up).
    serve_api_keys: list[ApiKey] = Field(default_factory=list)
    serve_api_keys_file: Path | None = None
    # GET /metrics: open to anyone, only to "admin" keys, or not served at all.
    serve_metrics_auth: Literal["public", "admin", "off"] = "public"
    # A request body that has not fully arrived after this long answers 408 (slow clients cut off).
    serve_body_timeout_s: float = Field(default=5.0, gt=0)
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8000, ge=0, le=65535)
    serve_workers: int = Field(default=1, ge=1)
    serve_max_body_bytes: int = Field(default=65536, ge=1)
    # Bounds the online-feature read of one request; a slower read answers 504.
    serve_request_timeout_s: float = Field(default=2.0, gt=0)
    # Prediction-log records queued in the producer while the broker is slow or away; beyond it they drop.
    serve_prediction_buffer: int = Field(default=100_000, ge=1)
    # PEM file of trusted Ed25519 public keys. Set: only versions signed by one of them load. Unset:
    # signatures are not checked (logged once). See models/signing.py.
    serve_trusted_keys_file: str | None = None
    # Bounds on fetching an artifact by URI (artifact_uri), per model version.
    serve_artifact_timeout_s: float = Field(default=10.0, gt=0)
    serve_artifact_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    # A deployment naming a version this node has not read is held this long (shown pending), then refused.
    serve_deployment_pending_s: float = Field(default=60.0, gt=0)


def load_policy(settings: ServeSettings) -> LoadPolicy:
    """How model versions are loaded: the trusted keys (read now: ConfigError naming the file when they
    do not load) and the bounds on fetching artifacts."""
    keys = settings.serve_trusted_keys_file
    return LoadPolicy(
        verifier=Verifier.from_pem_file(Path(keys)) if keys else None,
        fetch_timeout_s=settings.serve_artifact_timeout_s,
        max_artifact_bytes=settings.serve_artifact_max_bytes,
    )
