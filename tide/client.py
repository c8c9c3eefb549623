"""The Python API for applications and notebooks: one :class:`Client` per Tide namespace.

    from tide import Client
    client = Client.connect()                       # TIDE_* settings, or the running `tide up` stack
    client.produce("clicks", [{...}, ...])          # validated against the source's schema, keyed
    client.online_features("user_activity", ["u1"]) # current values per entity
    client.training_set("scorer")                   # point-in-time rows as a pandas DataFrame
    client.evaluate("scorer")                       # progressive evaluation of the model's learner

The definitions come from the registry (what ``tide apply`` registered), as every service reads them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from features.store import RedisOnlineStore
from features.training import Example, replay
from infra.errors import DefinitionError
from infra.imports import add_code_path
from infra.settings import CommonSettings, load
from online_training.learner import OnlineModel, build_learner
from schemas import registry
from schemas.definitions import Project
from streams.produce import SourceProducer
from streams.sources import find_source

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Client:
    settings: CommonSettings
    project: Project
    definitions_version: int
    _producers: dict[str, SourceProducer] = field(default_factory=dict, repr=False)

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
        spec = find_source(self.project, source)
        producer = self._producers.get(spec.name)
        if producer is None:  # one producer per source for the client's life: a new one costs ~0.5 s
            producer = self._producers[spec.name] = SourceProducer(self.settings, spec)
        before = producer.sent
        for record in records:
            producer.send(record)
        producer.flush(flush_s)
        return producer.sent - before

    def online_features(self, view: str, entities: Sequence[str]) -> pd.DataFrame:
        """One row per entity: the view's current values (defaults when missing or expired), ``status``
        (present, missing, expired) and ``age_ms`` of the newest event, read in one round trip."""
        import pandas as pd

        spec = self.project.views.get(view)
        if spec is None:
            raise DefinitionError(f"no feature view {view!r} (views: {', '.join(self.project.views)})")

        async def read() -> list[Any]:
            store = RedisOnlineStore.from_url(self.settings.redis_url, self.settings.topic_prefix)
            try:
                return await store.read(spec, list(entities))
            finally:
                await store.close()

        rows = asyncio.run(read())
        return pd.DataFrame(
            [{"entity": r.entity, **r.values, "status": r.status, "age_ms": r.age_ms} for r in rows]
        )

    def examples(self, model: str) -> list[Example]:
        """The model's point-in-time examples replayed from the topics, in event-time order."""
        spec = self.project.models.get(model)
        if spec is None:
            raise DefinitionError(f"no model {model!r} (models: {', '.join(self.project.models)})")
        return replay(self.settings, self.project, spec)

    def training_set(self, model: str) -> pd.DataFrame:
        """The model's point-in-time training set: one row per label, with the labels key, the event
        time, every input as serving would have seen it just before the event, and the target."""
        import pandas as pd

        rows = [{"key": e.key, "ts": e.ts, **e.x, "target": e.y} for e in self.examples(model)]
        columns = ["key", "ts", *self.project.models[model].input_names, "target"]
        return pd.DataFrame(rows, columns=columns)

    def evaluate(
        self,
        model: str,
        factory: Callable[[], Any] | None = None,
        *,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> dict[str, Any]:
        """Progressive evaluation offline: the model's examples with event times in
        ``[start_ms, end_ms)`` replayed from the topics, in event-time order, each predicted and then
        learnt (river's ``progressive_val_score``) by a fresh learner from ``factory`` (default: the
        model's declared learner), fed to the model's declared metric."""
        examples = [
            e
            for e in self.examples(model)
            if (start_ms is None or e.ts >= start_ms) and (end_ms is None or e.ts < end_ms)
        ]
        spec = self.project.models[model]
        online = OnlineModel(spec, factory() if factory is not None else build_learner(spec))
        predictions = [online.learn(dict(e.x), e.y) for e in examples]
        return {
            "model": model,
            "examples": len(examples),
            "metric": spec.metric_name,
            "value": online.metric_value(),
            "predictions": predictions,
        }
