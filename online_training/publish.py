"""Publishing model versions: the one way both trainers (and benchmarks) put a version on the models topic.

:func:`publish_model_version` builds the ``model_version`` record (with the model's task, classes and
its lineage: the digest of the definitions it was trained with, the version of each view it read, its
parent version, trigger, training data and blessing),
stores the artifact inline (up to ``artifact_inline_max_bytes``) or in the artifact store by URI, signs
it when a signing key is configured (:mod:`models.signing`) and produces it keyed by model name.
:func:`newest_versions` reads the newest committed version of every model in one pass over the models
topic.

Exactly-once: with the caller's transactional producer (the online trainer's), the record is only
produced; it becomes visible when the caller commits the transaction that also holds the consumed
offsets. An artifact written to the store for a transaction that then aborts stays as an unreferenced
file (content-addressed, so a retry rewrites the same name). Without a producer, an idempotent one is
created, and the call returns once the broker has acknowledged the record.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from infra.errors import TrainingError
from infra.kafka import make_producer
from infra.settings import CommonSettings
from infra.topics import topic
from models.artifacts import LocalArtifactStore, sha256_hex
from models.signing import Signer
from models.versions import read_versions
from online_training.settings import PublishSettings
from schemas import codec
from schemas.records import Blessing, TrainingData

log = logging.getLogger(__name__)

_DEFAULTS = PublishSettings.model_fields
FLUSH_TIMEOUT_S = 30.0


@functools.lru_cache(maxsize=8)
def _signer(path: str) -> Signer:
    return Signer.from_pem_file(Path(path))


def signer_of(settings: CommonSettings) -> Signer | None:
    """The signer ``settings`` configure (loaded once per key file), or None when versions go unsigned."""
    path = settings.signing_key_file if isinstance(settings, PublishSettings) else None
    return _signer(path) if path else None


def store_of(settings: CommonSettings) -> LocalArtifactStore:
    """The artifact store ``settings`` configure: ``artifact_store``, else ``<state_dir>/artifacts``."""
    root = settings.artifact_store if isinstance(settings, PublishSettings) else None
    return LocalArtifactStore(Path(root) if root else Path(settings.state_dir) / "artifacts")


def _inline_max(settings: CommonSettings) -> int:
    if isinstance(settings, PublishSettings):
        return settings.artifact_inline_max_bytes
    default: int = _DEFAULTS["artifact_inline_max_bytes"].default
    return default


def build_record(
    settings: CommonSettings,
    *,
    model: str,
    version: int,
    flavor: str,
    artifact: bytes,
    feature_names: Sequence[str],
    metric_name: str = "",
    metric_value: float | None = None,
    trained_on: int = 0,
    reference: Mapping[str, Any] | None = None,
    task: str = "binary",
    classes: Sequence[str] = (),
    definitions_digest: str | None = None,
    view_versions: Mapping[str, int] | None = None,
    parent_version: int | None = None,
    trigger: str | None = None,
    data: TrainingData | None = None,
    blessing: Blessing | None = None,
) -> dict[str, Any]:
    """The ``model_version`` record for an artifact: stored inline or by URI, signed when configured.
    ``definitions_digest`` and ``view_versions`` (view name -> version) are its lineage: the registry
    definitions and the view versions it was trained with; ``parent_version`` (the version it continues
    or replaces: the champion when its training started), ``trigger`` (``schedule`` or the alert),
    ``data`` (event-time range and topic offsets learnt) and ``blessing`` (its evaluation against the
    champion, :mod:`online_training.blessing`) complete it."""
    digest = sha256_hex(artifact)
    inline = len(artifact) <= _inline_max(settings)
    record: dict[str, Any] = {
        "model": model,
        "version": int(version),
        "flavor": flavor,
        "task": task,
        "classes": [str(c) for c in classes],
        "artifact": artifact if inline else b"",
        "artifact_uri": None if inline else store_of(settings).put(model, flavor, artifact),
        "sha256": digest,
        "feature_names": list(feature_names),
        "metric_name": metric_name,
        "metric_value": None if metric_value is None else float(metric_value),
        "trained_on": int(trained_on),
        "reference": dict(reference) if reference is not None else None,
        "created_ts": int(time.time() * 1000),
        "signature": None,
        "key_id": None,
        "definitions_digest": definitions_digest,
        "view_versions": {str(name): int(v) for name, v in (view_versions or {}).items()},
        "parent_version": None if parent_version is None else int(parent_version),
        "trigger": trigger,
        "data": None if data is None else {"first_ts": None, "last_ts": None, "offsets": {}, **data},
        "blessing": None if blessing is None else dict(blessing),
    }
    signer = signer_of(settings)
    if signer is not None:
        record["signature"], record["key_id"] = signer.sign(record)
    return record


def publish_model_version(
    settings: CommonSettings,
    *,
    model: str,
    version: int,
    flavor: str,
    artifact: bytes,
    feature_names: Sequence[str],
    metric_name: str = "",
    metric_value: float | None = None,
    trained_on: int = 0,
    reference: Mapping[str, Any] | None = None,
    task: str = "binary",
    classes: Sequence[str] = (),
    definitions_digest: str | None = None,
    view_versions: Mapping[str, int] | None = None,
    parent_version: int | None = None,
    trigger: str | None = None,
    data: TrainingData | None = None,
    blessing: Blessing | None = None,
    producer: Producer | None = None,
) -> dict[str, Any]:
    """Build (:func:`build_record`) and produce a model version; returns the record published.

    With ``producer`` (e.g. a transactional one inside its transaction) the record is only produced;
    without, an idempotent producer is made, and this returns after delivery (TrainingError if not).
    """
    record = build_record(
        settings,
        model=model,
        version=version,
        flavor=flavor,
        artifact=artifact,
        feature_names=feature_names,
        metric_name=metric_name,
        metric_value=metric_value,
        trained_on=trained_on,
        reference=reference,
        task=task,
        classes=classes,
        definitions_digest=definitions_digest,
        view_versions=view_versions,
        parent_version=parent_version,
        trigger=trigger,
        data=data,
        blessing=blessing,
    )
    value = codec.encode("model_version", record)
    name = topic(settings, "models")
    if producer is not None:
        producer.produce(name, key=model.encode(), value=value)
    else:
        _produce_and_wait(settings, name, model.encode(), value)
    log.info(
        "published model=%s version=%d flavor=%s parent=%s trigger=%s %s views=%s artifact=%s (%d bytes) "
        "%s=%s %s",
        model,
        version,
        flavor,
        parent_version,
        trigger,
        "blessing=-"
        if blessing is None
        else f"{'blessed' if blessing['blessed'] else 'NOT blessed'} ({blessing['reason']})",
        ",".join(f"{name}@{v}" for name, v in sorted(record["view_versions"].items())) or "-",
        "inline" if record["artifact_uri"] is None else record["artifact_uri"],
        len(artifact),
        metric_name or "metric",
        metric_value,
        f"signed by {record['key_id']}" if record["key_id"] else "unsigned",
    )
    return record


def _produce_and_wait(settings: CommonSettings, name: str, key: bytes, value: bytes) -> None:
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    producer = make_producer(settings)
    producer.produce(name, key=key, value=value, on_delivery=on_delivery)
    if producer.flush(FLUSH_TIMEOUT_S):
        raise TrainingError(f"model version not delivered to {name} within {FLUSH_TIMEOUT_S:.0f} s")
    if errors:
        raise TrainingError(f"model version not delivered to {name}: {errors[0]}")


def latest_record(settings: CommonSettings, model: str, flavor: str | None = None) -> dict[str, Any] | None:
    """The newest committed version of ``model`` (of ``flavor``, when given), read from the beginning."""
    return newest_versions(settings, flavor).get(model)


def newest_versions(settings: CommonSettings, flavor: str | None = None) -> dict[str, dict[str, Any]]:
    """Model name -> its newest committed version (of ``flavor``, when given), in one read of the topic."""
    newest: dict[str, dict[str, Any]] = {}
    for record in read_versions(settings):
        if flavor is not None and record["flavor"] != flavor:
            continue
        seen = newest.get(record["model"])
        if seen is None or record["version"] > seen["version"]:
            newest[record["model"]] = record
    return newest
