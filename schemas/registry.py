"""The definitions registry: applied project definitions, versioned, on the ``registry`` topic.

``tide apply`` appends one ``definitions`` record per change (project, version, content digest and the
canonical JSON). The topic is the registry's log, read from the beginning like ``models``; its one
partition orders every write, and that order decides which write takes a version:

    a record is *accepted* when its version is one more than the last accepted record's.

A writer bases its record on the newest accepted version it read (``expected``). Two applies that read
the same version both write ``expected + 1``; the one the broker appended first is accepted, the other is
not (its version is no longer the next one), whatever any reader's timing. :func:`publish` reads the log
back up to its own record and raises :class:`RegistryConflict` when it lost, so the loser is told to plan
again against the winner. This is compare-and-set on an ordered log: it needs no lock, no transactions and
works the same on any Kafka-protocol broker.

Every service reads the newest accepted definitions at start (:func:`load`) and follows the log while it
runs (:class:`Follower`, :func:`follow`): a change applied while everything runs reaches every node
within its poll interval, with no restart and no cache to expire.
"""

from __future__ import annotations

import getpass
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message

from infra.admin import topic_exists
from infra.errors import DefinitionError, RegistryConflict, SchemaError, StreamError
from infra.kafka import make_producer, read_to_end, reader_from_beginning
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


class Log:
    """The accepted records of the registry log, folded in offset order (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.newest: dict[str, Any] | None = None
        self.offset_of: dict[int, int] = {}  # accepted version -> its offset

    @property
    def version(self) -> int:
        return self.newest["version"] if self.newest else 0

    def add(self, msg: Message) -> bool:
        """Folds one record; True when it is accepted (the next version)."""
        try:
            record = codec.decode(msg.value() or b"", "definitions")
        except SchemaError as exc:
            log.warning("undecodable record on %s offset %s: %s", self.name, msg.offset(), exc)
            return False
        if record["version"] != self.version + 1:
            return False
        self.newest = record
        self.offset_of[record["version"]] = msg.offset() or 0
        return True

    def registered(self) -> Registered | None:
        d = self.newest
        if d is None:
            return None
        project = Project.from_dict(orjson.loads(d["body"]))
        return Registered(d["version"], d["digest"], project, d["applied_by"], d["ts"])


def _read(settings: CommonSettings) -> Log:
    name = topic(settings, "registry")
    folded = Log(name)
    if topic_exists(settings.kafka_bootstrap, name):
        for msg in read_to_end(settings, name, TOPICS["registry"].partitions):
            folded.add(msg)
    return folded


def latest(settings: CommonSettings) -> Registered | None:
    """The newest accepted definitions, or None when nothing was applied yet."""
    return _read(settings).registered()


def register_schemas(project: Project) -> None:
    """Make every source's schema versions known to the codec (records of any version then decode)."""
    for source in project.sources.values():
        codec.register(source.name, list(source.versions))


def _announce(found: Registered) -> Registered:
    register_schemas(found.project)
    log.info(
        "definitions of project %s, version %d (%s)", found.project.name, found.version, found.digest[:12]
    )
    return found


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
    return _announce(found)


def publish(settings: CommonSettings, project: Project, version: int) -> Registered:
    """Append ``project`` as registry ``version`` (compare-and-set: it must be the next version).

    Returns what was written once the log shows it accepted; raises :class:`RegistryConflict` when another
    apply took ``version`` first (or the registry is past ``version - 1``): plan again.
    """
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
    name = topic(settings, "registry")
    written: list[int] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            written.append(msg.offset() or 0)

    producer = make_producer(settings)
    producer.produce(
        name, key=project.name.encode(), value=codec.encode("definitions", record), on_delivery=delivered
    )
    if producer.flush(15) or not written:
        raise DefinitionError("the registry did not acknowledge the definitions within 15 s")
    folded = _read(settings)
    if folded.offset_of.get(version) != written[0]:
        winner = folded.newest or {}
        raise RegistryConflict(
            f"registry version {version} was taken first by {winner.get('applied_by', '?')} "
            f"(now at version {folded.version}, digest {str(winner.get('digest', ''))[:12]}): "
            "your change was not applied; run 'tide plan' again against it"
        )
    return Registered(version, digest, project, applied_by, ts)


class Follower:
    """The registry as a running service sees it: the newest accepted definitions, kept current.

    Its consumer stays assigned to the log; :meth:`poll` takes what arrived since (never blocks) and
    returns the newer definitions, their sources' schemas registered with the codec, so records of a new
    schema version decode before anything that reads them runs.
    """

    def __init__(self, settings: CommonSettings) -> None:
        self.name = topic(settings, "registry")
        self._log = Log(self.name)
        self._consumer = reader_from_beginning(
            settings, self.name, TOPICS["registry"].partitions, **{"enable.partition.eof": True}
        )
        self._settled = False
        deadline = time.monotonic() + 30
        while not self._settled:  # the log as it stands, before the first poll
            if time.monotonic() > deadline:
                raise StreamError(f"{self.name}: end not reached within 30 s")
            self._take(0.2)
        found = self._log.registered()
        if found is None:
            self.close()
            raise DefinitionError(
                f"no definitions applied in namespace {settings.topic_prefix!r}: "
                "run 'tide apply --project DIR' first"
            )
        self.current = _announce(found)

    def _take(self, timeout: float) -> bool:
        """Consumes what is there; True when a record was accepted."""
        accepted = False
        for msg in self._consumer.consume(200, timeout):
            err = msg.error()
            if err is None:
                accepted = self._log.add(msg) or accepted
            elif err.code() == KafkaError._PARTITION_EOF:
                self._settled = True
            elif err.fatal():
                raise StreamError(f"fatal error reading {self.name}: {err}")
        return accepted

    def poll(self, timeout: float = 0.0) -> Registered | None:
        """Newer definitions than :attr:`current` (now current), or None."""
        if not self._take(timeout):
            return None
        found = self._log.registered()
        if found is None or found.version <= self.current.version:
            return None
        self.current = _announce(found)
        return found

    def close(self) -> None:
        self._consumer.close()


def follow(
    settings: CommonSettings,
    on_change: Callable[[Registered], None],
    stop: threading.Event,
    *,
    interval_s: float = 0.5,
    follower: Follower | None = None,
) -> threading.Thread:
    """Calls ``on_change`` (on a daemon thread) with every newer version of the definitions until ``stop``.

    An ``on_change`` that raises is logged and the version skipped: a bad change never stops a service
    (``tide plan`` has checked it; what a service cannot run it logs).
    """
    watcher = follower or Follower(settings)

    def run() -> None:
        try:
            while not stop.is_set():
                found = watcher.poll(interval_s)
                if found is not None:
                    try:
                        on_change(found)
                    except Exception:
                        log.exception("definitions version %d could not be taken up", found.version)
        finally:
            watcher.close()

    thread = threading.Thread(target=run, name="registry-follower", daemon=True)
    thread.start()
    return thread
