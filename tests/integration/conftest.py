"""Fixtures shared by the integration tests (the embedded stack and settings come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import CommonSettings
from tide.processes import Services


@pytest.fixture
def services(settings: CommonSettings, tmp_path: Path) -> Iterator[Services]:
    """``tide features`` processes of this test's namespace (they read what the test applied)."""
    svc = Services(
        {
            "TIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "TIDE_REDIS_URL": settings.redis_url,
            "TIDE_TOPIC_PREFIX": settings.topic_prefix,
            "TIDE_STATE_DIR": str(tmp_path),
            "TIDE_FEATURES_GROUP": f"{settings.topic_prefix}features",
            "TIDE_FEATURES_BATCH": "200",
            "TIDE_FEATURES_RETIRE_GRACE_MS": "500",  # a retired view version's keys go at once
        },
        tmp_path / "logs",
    )
    yield svc
    svc.stop_all()
