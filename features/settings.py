"""Settings of the feature processor (``TIDE_FEATURES_*``)."""

from __future__ import annotations

from pydantic import Field

from infra.settings import CommonSettings


class FeatureSettings(CommonSettings):
    features_group: str = "tide-features"
    features_batch: int = Field(default=1000, ge=1)
    features_batch_ms: int = Field(default=50, ge=1)
    # Longest a fetch may wait for data (faust's own default is 1500 ms; see features/faust_transport.py).
    features_fetch_max_wait_ms: int = Field(default=100, ge=1)
