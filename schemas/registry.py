"""The definitions registry: applied project definitions, versioned, on the ``registry`` topic.

``tide apply`` appends one ``definitions`` record per change (project, version, content digest and the
canonical JSON). Every service reads the newest at start (:func:`load`), so every node runs the same
definitions and none reads the project's files. The topic is state, read from the beginning like
``models``; a newer version supersedes the older ones.
"""

from __future__ import annotations

import getpass
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson

from infra.admin import topic_exists
from infra.errors import DefinitionError, SchemaError
from infra.kafka import make_producer, read_to_end
from infra.settings import CommonSettings
from infra.topics import TOPICS, topic
from schemas import codec
from schemas.definitions import Project

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registered:
    """One applied version of a project's definitions."""

    version: int
    digest: str
    project: Project
    applied_by: str
    ts: int


def _decode(value: bytes) -> dict[str, Any]:
    return codec.decode(value, "definitions")


def latest(settings: CommonSettings) -> Registered | None:
    """The newest applied definitions, or None when nothing was applied yet."""
    newest: dict[str, Any] | None = None
    name = topic(settings, "registry")
    if not topic_exists(settings.kafka_bootstrap, name):
        return None
    for msg in read_to_end(settings, name, TOPICS["registry"].partitions):
        try:
            record = _decode(msg.value() or b"")
        except SchemaError as exc:
            log.warning("undecodable record on %s offset %s: %s", name, msg.offset(), exc)
            continue
        if newest is None or record["version"] > newest["version"]:
            newest = record
    if newest is None:
        return None
    project = Project.from_dict(orjson.loads(newest["body"]))
    return Registered(newest["version"], newest["digest"], project, newest["applied_by"], newest["ts"])


def register_schemas(project: Project) -> None:
    """Make every source's schema versions known to the codec (records of any version then decode)."""
    for source in project.sources.values():
        codec.register(source.name, list(source.versions))


def load(settings: CommonSettings) -> Registered:
    """The definitions every service runs: the newest applied, with their sources' schemas registered.

    Raises :class:`DefinitionError` when nothing was applied (run ``tide apply`` first).
    """
    found = latest(settings)
    if found is None:
        raise DefinitionError(
            f"no definitions applied in namespace {settings.topic_prefix!r}: "
            "run 'tide apply --project DIR' first"
        )
    register_schemas(found.project)
    log.info(
        "definitions of project %s, version %d (%s)", found.project.name, found.version, found.digest[:12]
    )
    return found


def publish(settings: CommonSettings, project: Project, version: int) -> Registered:
    """Append ``project`` as registry ``version``; returns what was written once the broker has it."""
    applied_by = f"{getpass.getuser()}@{socket.gethostname()}"
    ts = int(time.time() * 1000)
    digest = project.digest()
    record = {
        "project": project.name,
        "version": version,
        "digest": digest,
        "body": project.canonical_json().decode(),
        "applied_by": applied_by,
        "ts": ts,
    }
    producer = make_producer(settings)
    producer.produce(
        topic(settings, "registry"), key=project.name.encode(), value=codec.encode("definitions", record)
    )
    if producer.flush(15):
        raise DefinitionError("the registry did not acknowledge the definitions within 15 s")
    return Registered(version, digest, project, applied_by, ts)
