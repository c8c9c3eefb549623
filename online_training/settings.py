"""Settings of the model publishers (both trainers) and of the batch retrainer (``tide retrain``).

Plain pydantic-settings classes with no heavy imports: the online trainer's settings extend
:class:`PublishSettings`, and ``tide retrain`` builds :class:`RetrainSettings` in its entry point.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infra.settings import CommonSettings


class PublishSettings(CommonSettings):
    """How a trainer publishes a model version (``TIDE_SIGNING_KEY_FILE``, ``TIDE_ARTIFACT_*``)."""

    # PEM Ed25519 private key (PKCS#8, unencrypted): versions are signed when set. `tide keys new` makes one.
    signing_key_file: str | None = None
    # Directory where artifacts too large to travel inline are stored (content-addressed, file:// URIs).
    # Every serving node must see it (a shared volume); default: <state_dir>/artifacts.
    artifact_store: str | None = None
    # Artifacts up to this size travel inside the record; larger ones by URI. A Kafka record must stay
    # under the broker's message.max.bytes (1 MiB by default) with the rest of the record.
    artifact_inline_max_bytes: int = Field(default=256 * 1024, ge=0, le=768 * 1024)


class RetrainSettings(PublishSettings):
    """The batch retrainer: a PyTorch MLP on point-in-time features, published as an ONNX version."""

    retrain_model_name: str = Field(default="fraud-nn", pattern=r"^[a-z][a-z0-9_-]*$")
    retrain_epochs: int = Field(default=30, ge=1, le=10_000)
    retrain_hidden: int = Field(default=32, ge=1, le=4096)
    # The newest share of labels (by event time) held out for evaluation and the ONNX parity check.
    retrain_holdout: float = Field(default=0.2, gt=0.0, lt=0.9)
    # Fewer labels than this: no training (too few to learn from, or to evaluate).
    retrain_min_labels: int = Field(default=1000, ge=10)
    # A model below this held-out ROC AUC is not published.
    retrain_min_auc: float = Field(default=0.5, ge=0.0, le=1.0)
    retrain_device: Literal["auto", "cpu", "cuda"] = "auto"
    retrain_seed: int = 0
