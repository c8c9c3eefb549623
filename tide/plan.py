"""``tide plan`` and ``tide apply``: validate a project against the registry, then register it.

:func:`plan` checks everything a running system would trip on later — every definition (done when the
project loads), each source's schema against every version registered before it (backward
compatibility), and every learner and batch-trainer factory, imported and tried on a sample record — and
lists what :func:`apply` would do: topics to create, every change against the registered definitions
classed metadata / additive / breaking (:mod:`tide.diff`), the view versions, the registry version it
would write. ``apply`` does it: refuses breaking changes unless allowed, creates the topics, then appends
the definitions with their content digest to the registry (nothing when the digest is unchanged) with
compare-and-set semantics (:func:`schemas.registry.publish`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from fastavro import parse_schema

from infra.admin import create_topics
from infra.errors import BreakingChange, DefinitionError, TideError
from infra.imports import import_object
from infra.settings import CommonSettings
from infra.topics import ensure_topics
from models.inputs import ModelInputs
from online_training.learner import OnlineModel, build_learner
from schemas import codec, registry
from schemas.definitions import Model, Project, Source
from schemas.registry import Registered
from tide.diff import diff, versioned

log = logging.getLogger(__name__)


@dataclass
class Plan:
    project: Project  # with each source's schema history filled from the registry
    current: Registered | None
    topics: dict[str, int] = field(default_factory=dict)  # source topics (prefixed) -> partitions
    changes: list[dict[str, str]] = field(default_factory=list)

    @property
    def version(self) -> int:
        """The registry version apply writes (the current one when nothing changed)."""
        if self.current is None:
            return 1
        return self.current.version + (1 if self.changes else 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "project": self.project.name,
            "digest": self.project.digest(),
            "registered_version": self.current.version if self.current else None,
            "version": self.version,
            "up_to_date": not self.changes,
            "topics": self.topics,
            "changes": self.changes,
            "breaking": [f"{c['kind']} {c['name']}" for c in self.changes if c["class"] == "breaking"],
            "views": {name: v.version for name, v in sorted(self.project.views.items())},
            "previous_views": sorted(self.project.previous_views),
        }


def with_history(project: Project, current: Project | None) -> Project:
    """``project`` with each source's earlier schema versions taken from the registry.

    A changed schema must read every earlier version (Avro backward compatibility): old records stay
    readable. Raises :class:`DefinitionError` naming the source and what breaks.
    """
    if current is None:
        return project
    sources: dict[str, Source] = {}
    for name, source in project.sources.items():
        before = current.sources.get(name)
        if before is None:
            sources[name] = source
            continue
        versions = list(before.versions)
        if dict(versions[-1]) == dict(source.parsed):
            sources[name] = dataclasses.replace(source, history=tuple(versions[:-1]))
            continue
        reader = codec_parse(source.parsed)
        for i, old in enumerate(versions, start=1):
            problems = codec.compatibility_problems(codec_parse(old), reader)
            if problems:
                raise DefinitionError(
                    f"{project.where('source', name)}source {name!r}, field 'schema': the new schema "
                    f"cannot read records written with registered version {i}: {problems[0]} "
                    f"(add fields with defaults; "
                    f"never remove or retype a field without one)"
                )
        sources[name] = dataclasses.replace(source, history=tuple(versions))
    return rebind(project, sources)


def codec_parse(schema: Mapping[str, Any]) -> dict[str, Any]:
    return cast(dict[str, Any], parse_schema(dict(schema)))


def rebind(project: Project, sources: Mapping[str, Source]) -> Project:
    """``project`` with its sources replaced (views, labels and models re-pointed at the new ones)."""
    return Project.from_dict({**project.to_dict(), "sources": [s.to_dict() for s in sources.values()]})


def check_factories(project: Project) -> None:
    """Import each model's learner and batch trainer and try them on a sample record."""
    for model in project.models.values():
        where = f"{project.where('model', model.name)}model {model.name!r}"
        if model.learner:
            try_learner(model, project)
        if model.batch_trainer:
            from online_training.batch import check_model  # torch: imported only for such models

            try:
                factory = import_object(model.batch_trainer)
                check_model(project, model)
            except TideError as exc:
                raise DefinitionError(f"{where}, field 'batch_trainer': {exc}") from None
            if not callable(factory):
                raise DefinitionError(
                    f"{where}, field 'batch_trainer': {model.batch_trainer!r} is not callable"
                )


def sample_target(model: Model) -> Any:
    return {"binary": True, "regression": 1.0, "multiclass": "a"}[model.task]


def try_learner(model: Model, project: Project) -> None:
    """Build the model's learner and metric and learn one sample the way the trainer does: a factory
    that fails here would fail on the first label. Raises :class:`DefinitionError` naming the model."""
    where = f"{project.where('model', model.name)}"
    try:
        online = OnlineModel(model, build_learner(model))
    except TideError as exc:
        raise DefinitionError(f"{where}{exc}") from None
    x = ModelInputs.of(project, model).synthetic()  # the input serving warms a version up with
    try:
        online.learn(x, sample_target(model))
        online.learn(x, sample_target(model))
    except Exception as exc:
        raise DefinitionError(
            f"{where}model {model.name!r}, field 'learner': {model.learner} fails on a sample input "
            f"{sorted(x)}: {type(exc).__name__}: {exc}"
        ) from exc


def plan(settings: CommonSettings, project: Project) -> Plan:
    """Everything :func:`apply` would do, checked; raises :class:`DefinitionError` on the first problem."""
    current = registry.latest(settings)
    if current is not None and current.project.name != project.name:
        raise DefinitionError(
            f"namespace {settings.topic_prefix!r} runs project {current.project.name!r}; "
            f"project {project.name!r} needs its own TIDE_TOPIC_PREFIX"
        )
    before = current.project if current else None
    project = with_history(project, before)
    check_factories(project)
    topics = {settings.topic_prefix + s.topic_name: s.partitions for s in project.sources.values()}
    next_version = current.version + 1 if current else 1
    project = versioned(before, project, next_version, retired_views(settings, before))
    changes = diff(before, project)
    if before is not None:
        dropped = sorted(set(before.previous_views) - set(project.previous_views))
        changes += [
            {"kind": "views", "name": ref, "change": "removed", "class": "metadata", "detail": "retired"}
            for ref in dropped
        ]
    if current is not None and current.digest == project.digest():
        changes = []
    return Plan(project, current, topics, changes)


def retired_views(settings: CommonSettings, before: Project | None) -> set[str]:
    """The kept view versions the feature processor has retired (dropped from the next definitions)."""
    if before is None or not before.previous_views:
        return set()
    from features.versions import read_states

    client = redis.Redis.from_url(settings.redis_url)
    try:
        states = read_states(client, settings.topic_prefix)
    except redis.RedisError as exc:
        log.warning("cannot read the view versions' states (%s); keeping every previous version", exc)
        return set()
    finally:
        client.close()
    return {ref for ref, state in states.items() if state.state == "retired"}


def apply(
    settings: CommonSettings,
    project: Project,
    *,
    replication_factor: int = 1,
    allow_breaking: bool = False,
) -> dict[str, Any]:
    """Create the topics and register the definitions; returns the plan that was carried out.

    Breaking changes are refused (:class:`BreakingChange`, naming each) unless ``allow_breaking``; a
    concurrent apply that took the registry version first makes this one fail with
    :class:`RegistryConflict` (nothing applied: plan again).
    """
    p = plan(settings, project)
    breaking = [c for c in p.changes if c["class"] == "breaking"]
    if breaking and not allow_breaking:
        names = "; ".join(f"{c['kind']} {c['name']!r}: {c['detail']}" for c in breaking)
        raise BreakingChange(
            f"refusing {len(breaking)} breaking change(s) without --allow-breaking: {names}", breaking
        )
    ensure_topics(settings, replication_factor=replication_factor)
    create_topics(settings.kafka_bootstrap, p.topics, replication_factor=replication_factor)
    if p.changes:
        registry.publish(settings, p.project, p.version)
        log.info("applied project %s as registry version %d", project.name, p.version)
    return {**p.as_dict(), "applied": bool(p.changes)}
