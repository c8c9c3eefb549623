"""Topic administration: create and delete topics with explicit partition counts, and wait for metadata.

Topics are always created up front with explicit partition counts: a broker that auto-creates topics may
give them one partition, which silently caps a consumer group's parallelism.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from infra.errors import StreamError

logger = logging.getLogger(__name__)


def _admin(bootstrap: str) -> AdminClient:
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": logger}
    return AdminClient(config)


def _results(
    futures: Mapping[str, Future[Any]], timeout: float, ok_codes: set[int]
) -> tuple[set[str], list[str]]:
    """Wait for admin futures. Returns (topics that failed with one of ``ok_codes``, error messages)."""
    tolerated: set[str] = set()
    errors: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is not None and err.code() in ok_codes:
                tolerated.add(name)
            else:
                errors.append(f"{name}: {err.str() if err is not None else exc}")
        except TimeoutError:
            errors.append(f"{name}: no answer within {timeout:.1f} s")
    return tolerated, errors


def _metadata(admin: AdminClient, deadline: float) -> ClusterMetadata | None:
    try:
        return admin.list_topics(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
    except KafkaException as exc:
        logger.debug("metadata request failed: %s", exc)
        return None


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    config: Mapping[str, str] | None = None,
    replication_factor: int = 1,
    timeout: float = 15.0,
) -> None:
    """Create ``topics`` (name -> partition count) with topic ``config``, then wait until the broker's
    metadata shows each with its partition count.

    A topic that already exists with the requested partition count counts as created, so this is
    idempotent. Raises :class:`StreamError` if a topic cannot be created, exists with another partition
    count, or does not appear within ``timeout`` seconds.
    """
    if not topics:
        return
    bad = {name: n for name, n in topics.items() if not name or n < 1}
    if bad:
        raise StreamError(f"invalid topics (need a name and at least 1 partition): {bad}")
    deadline = time.monotonic() + timeout
    admin = _admin(bootstrap)
    new = [
        NewTopic(name, num_partitions=n, replication_factor=replication_factor, config=dict(config or {}))
        for name, n in topics.items()
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    existed, errors = _results(futures, timeout, {KafkaError.TOPIC_ALREADY_EXISTS})
    if errors:
        raise StreamError(f"could not create topics on {bootstrap}: " + "; ".join(errors))

    pending = dict(topics)
    while True:
        md = _metadata(admin, deadline)
        if md is not None:
            for name, wanted in list(pending.items()):
                meta = md.topics.get(name)
                if meta is None or meta.error is not None:
                    continue
                if len(meta.partitions) == wanted:
                    del pending[name]
                elif name in existed:
                    raise StreamError(
                        f"topic {name!r} exists with {len(meta.partitions)} partitions, wanted {wanted}"
                    )
        if not pending:
            break
        if time.monotonic() >= deadline:
            raise StreamError(f"topics not in metadata on {bootstrap} after {timeout:.1f} s: {pending}")
        time.sleep(0.1)
    created = sorted(set(topics) - existed)
    logger.info("topics ready on %s: created %s, already present %s", bootstrap, created, sorted(existed))


def delete_topics(bootstrap: str, topics: Iterable[str], *, timeout: float = 15.0) -> None:
    """Delete ``topics`` and wait until metadata no longer lists them. Missing topics count as deleted."""
    names = list(dict.fromkeys(topics))
    if not names:
        return
    deadline = time.monotonic() + timeout
    admin = _admin(bootstrap)
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    _, errors = _results(futures, timeout, {KafkaError.UNKNOWN_TOPIC_OR_PART})
    if errors:
        raise StreamError(f"could not delete topics on {bootstrap}: " + "; ".join(errors))
    while True:
        md = _metadata(admin, deadline)
        remaining = [n for n in names if md is None or (n in md.topics and md.topics[n].error is None)]
        if not remaining:
            break
        if time.monotonic() >= deadline:
            raise StreamError(f"topics still listed on {bootstrap} after {timeout:.1f} s: {remaining}")
        time.sleep(0.1)
    logger.info("topics deleted on %s: %s", bootstrap, names)


def topic_exists(bootstrap: str, name: str, *, timeout: float = 10.0) -> bool:
    """Whether the broker knows topic ``name`` (readers of a missing topic would wait for nothing)."""
    metadata = _metadata(_admin(bootstrap), time.monotonic() + timeout)
    if metadata is None:
        raise StreamError(f"no metadata from {bootstrap} within {timeout:.0f} s")
    return name in metadata.topics
