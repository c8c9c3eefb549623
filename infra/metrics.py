"""Prometheus exposition for the stream processors (serving exposes ``/metrics`` itself)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from infra.settings import CommonSettings

log = logging.getLogger(__name__)


def serve_metrics(settings: CommonSettings) -> None:
    """Start the metrics endpoint on ``TIDE_METRICS_HOST:TIDE_METRICS_PORT`` if a port is set."""
    if settings.metrics_port is None:
        return
    start_http_server(settings.metrics_port, addr=settings.metrics_host)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
