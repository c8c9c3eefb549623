"""The Python API for applications and notebooks: one :class:`Client` per Tide namespace.

    from tide import Client
    client = Client.connect()                       # TIDE_* settings, or the running `tide up` stack
    client.produce("transactions", [{...}, ...])    # validated against the source's schema, keyed
    client.online_features("card_activity", ["c1"]) # current values per entity
    client.training_set("fraud")                    # point-in-time rows as a pandas DataFrame
    client.evaluate("fraud")                        # progressive evaluation of the model's learner

The definitions come from the registry (what ``tide apply`` registered), as every service reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from infra.errors import DefinitionError, StreamError
from infra.imports import add_code_path
from infra.kafka import make_producer
from infra.settings import CommonSettings, load
from infra.topics import prefixed
from schemas import codec, registry
from schemas.definitions import Project

log = logging.getLogger(__name__)


@dataclass
class Client:
    settings: CommonSettings
    project: Project
    definitions_version: int

    @classmethod
    def connect(cls, settings: CommonSettings | None = None, **overrides: Any) -> Client:
        """A client of the namespace ``settings`` (default: from ``TIDE_*`` variables) points at."""
        settings = settings or load(CommonSettings, **overrides)
        found = registry.load(settings)
        add_code_path(settings.project)
        return cls(settings, found.project, found.version)

    def produce(self, source: str, records: Iterable[Mapping[str, Any]], *, flush_s: float = 30.0) -> int:
        """Validate each record against ``source``'s schema and produce it, keyed by the source's key.

        Raises :class:`SchemaError` naming the record and field before anything is sent for that
        record; returns how many were produced once the broker has acknowledged them all.
        """
        spec = self.project.sources.get(source)
        if spec is None:
            raise DefinitionError(f"no source {source!r} (sources: {', '.join(self.project.sources)})")
        producer = make_producer(self.settings)
        name = prefixed(self.settings, spec.topic_name)
        failed: list[str] = []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                failed.append(str(err))

        sent = 0
        for record in records:
            payload = codec.encode(spec.name, record)
            producer.produce(name, key=str(record[spec.key]).encode(), value=payload, on_delivery=on_delivery)
            sent += 1
            if sent % 10_000 == 0:
                producer.poll(0)
        if producer.flush(flush_s) or failed:
            raise StreamError(f"{source}: {len(failed)} records not delivered: {failed[:3]}")
        return sent
