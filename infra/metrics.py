"""Prometheus exposition for the stream processors (serving exposes ``/metrics`` itself)."""

from __future__ import annotations

import logging
import re

from prometheus_client import start_http_server

from infra.settings import CommonSettings

log = logging.getLogger(__name__)


def serve_metrics(settings: CommonSettings) -> None:
    """Start the metrics endpoint on ``TIDE_METRICS_HOST:TIDE_METRICS_PORT`` if a port is set."""
    if settings.metrics_port is None:
        return
    start_http_server(settings.metrics_port, addr=settings.metrics_host)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)


def metric_value(metrics_text: str, name: str, labels: str = "") -> float | None:
    """A sample's value from Prometheus text exposition."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{[^}]*\})?") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", metrics_text, re.MULTILINE)
    return float(match.groups()[-1]) if match else None
