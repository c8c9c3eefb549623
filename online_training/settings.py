"""Settings of the model publishers (both trainers), the online trainer and the batch retrainer.

Plain pydantic-settings classes with no heavy imports: ``tide train`` builds :class:`TrainerSettings` and
``tide retrain`` :class:`RetrainSettings` in their entry points. What is learnt, how often a version is
published and with which metric are the models' definitions (``publish_every``, ``metric``), not settings.
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


class TrainerSettings(PublishSettings):
    """The online trainer (``tide train``): every model of the project that declares a learner."""

    trainer_group: str = "tide-trainer"
    # A quiet stream still publishes what was learnt since a model's last version after this long.
    trainer_publish_interval_s: float = Field(default=10.0, gt=0)
    # How long parked served inputs, waiting labels and learnt markers are kept in Redis, beyond the
    # labels' declared max_delay.
    trainer_join_ttl_s: int = Field(default=86_400, ge=1)
    # How long a label waits for the prediction of its event before the event counts as never scored
    # and is learnt from point-in-time replayed features. A prediction is logged when its event is
    # scored, before its label exists: the grace only covers lag between the two topics.
    trainer_prediction_grace_s: float = Field(default=30.0, ge=0)
    # How often labels past their grace are looked for (each look that finds some replays the topics).
    trainer_catchup_interval_s: float = Field(default=5.0, gt=0)
    # Labels learnt from replayed features per catch-up, at most (the rest wait for the next one).
    trainer_catchup_max: int = Field(default=50_000, ge=1)
    # Inputs sampled (the newest) for each version's reference profile.
    trainer_reference_size: int = Field(default=2000, ge=10)
    # How often the trainer looks for newer definitions in the registry and for view versions made live
    # (a model whose binding changed starts a new lineage; see online_training.lineage).
    trainer_follow_interval_s: float = Field(default=1.0, gt=0)
    # About how many entries each model's learn log keeps (a Redis list: what was learnt, in order, with
    # the prediction made before learning it; the newest entries are kept); 0 keeps none.
    trainer_learn_log: int = Field(default=10_000, ge=0)
    # A refresh triggered by a concept alert that estimates its change point waits until the lineage has
    # learnt this many labels since it (at most the policy's window), then is warmed and blessed on them
    # (online_training.refresh); after trainer_refresh_max_wait_s it goes ahead with what there is.
    trainer_refresh_min_labels: int = Field(default=200, ge=1)
    trainer_refresh_max_wait_s: float = Field(default=600.0, gt=0)


class RetrainSettings(PublishSettings):
    """The batch retrainer: every model with a batch trainer, on point-in-time rows, published as ONNX."""

    # Consumer group of the drift-alerts reader of a periodic run (`tide retrain --every`).
    retrain_group: str = "tide-retrain"
    # A retraining triggered by a drift alert trains on this many of the newest training examples only
    # (recent data describes the changed world); 0: on all of them, as a scheduled one.
    retrain_triggered_labels: int = Field(default=0, ge=0)
    retrain_epochs: int = Field(default=30, ge=1, le=10_000)
    # The newest share of labels (by event time) held out for evaluation and the ONNX parity check.
    retrain_holdout: float = Field(default=0.2, gt=0.0, lt=0.9)
    # Fewer labels than this: no training (too few to learn from, or to evaluate).
    retrain_min_labels: int = Field(default=1000, ge=10)
    # A binary model whose held-out ROC AUC is not above this is not published (a regression model must
    # beat predicting the training mean on the held-out rows).
    retrain_min_auc: float = Field(default=0.5, ge=0.0, le=1.0)
    retrain_batch_size: int = Field(default=256, ge=1)
    retrain_lr: float = Field(default=3e-3, gt=0)
    retrain_device: Literal["auto", "cpu", "cuda"] = "auto"
    retrain_seed: int = 0
