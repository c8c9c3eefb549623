"""Settings of the scoring service (``TIDE_SERVE_*``)."""

from __future__ import annotations

from pydantic import Field

from infra.settings import CommonSettings


class ServeSettings(CommonSettings):
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8000, ge=0, le=65535)
    serve_workers: int = Field(default=1, ge=1)
    serve_max_body_bytes: int = Field(default=65536, ge=1)
    # Bounds the online-feature read of one request; a slower read answers 504.
    serve_request_timeout_s: float = Field(default=2.0, gt=0)
    # Prediction-log records queued in the producer while the broker is slow or away; beyond it they drop.
    serve_prediction_buffer: int = Field(default=100_000, ge=1)
