"""Settings of the feature processor (``TIDE_FEATURES_*``)."""

from __future__ import annotations

from pydantic import Field

from infra.settings import CommonSettings


class FeatureSettings(CommonSettings):
    features_group: str = "tide-features"
    features_batch: int = Field(default=1000, ge=1)
    features_batch_ms: int = Field(default=50, ge=1)
    # Longest the broker may hold a fetch for data (librdkafka's fetch.wait.max.ms): a broker that holds
    # fetches for the whole wait (the embedded one does) adds up to that much to every event's freshness.
    features_fetch_max_wait_ms: int = Field(default=100, ge=1)
