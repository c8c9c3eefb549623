"""Settings of the feature processor (``TIDE_FEATURES_*``)."""

from __future__ import annotations

from pydantic import Field

from infra.settings import CommonSettings


class FeatureSettings(CommonSettings):
    features_group: str = "tide-features"
    # Most records folded and written as one batch. A batch is whatever has been fetched when the
    # processor is free (one record is enough): small when it keeps up, this size when it is behind.
    features_batch: int = Field(default=1000, ge=1)
    # Longest one wait for the first record of a batch blocks (no record is held back for it).
    features_batch_ms: int = Field(default=50, ge=1)
    # Longest the broker may hold a fetch for data (librdkafka's fetch.wait.max.ms): a broker that holds
    # fetches for the whole wait (the embedded one does) adds up to that much to every event's freshness.
    features_fetch_max_wait_ms: int = Field(default=100, ge=1)
    # How long the keys of a retired view version stay readable (not updated any more) before they
    # expire: serving nodes still swapping to the model version trained on the newer view version keep
    # reading the old values meanwhile.
    features_retire_grace_ms: int = Field(default=60_000, ge=1)
