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

from infra.imports import add_code_path
from infra.settings import CommonSettings, load
from schemas import registry
from schemas.definitions import Project
from streams.produce import SourceProducer
from streams.sources import find_source

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

    def produce(self, source: str, records: Iterable[Mapping[str, Any]], *, flush_s: float = 60.0) -> int:
        """Check each record against ``source``'s schema and produce it, keyed by the source's key.

        A bad record raises :class:`SchemaError` naming the field before it is sent (those before it are
        sent); returns how many were produced once the broker has acknowledged them all.
        """
        producer = SourceProducer(self.settings, find_source(self.project, source))
        for record in records:
            producer.send(record)
        producer.flush(flush_s)
        return producer.sent
