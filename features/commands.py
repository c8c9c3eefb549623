"""``tide features``: the online feature processor and its read-outs, for the registry's definitions.

- ``tide features`` (or ``run``): the processor, every view of every source of the project;
- ``tide features list``: every feature of every view, one JSON line each;
- ``tide features get VIEW ENTITY [--version N]``: one view's current values for one entity (value,
  window, status, age), of its newest version or of a kept older one;
- ``tide features versions``: every kept view version, its state (backfilling, live, retired) and its
  backfill progress per source partition;
- ``tide features training-set --model NAME --out FILE``: the model's point-in-time training set (Avro).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from infra.console import AddCommand, emit, run_service
from infra.errors import FeatureError
from infra.settings import CommonSettings, load
from schemas.definitions import FeatureView, Project


def feature_listing(project: Project) -> list[dict[str, Any]]:
    """Every feature of every view of ``project``, as ``tide features list`` prints them."""
    out = []
    for view in project.views.values():
        for agg in view.aggregations:
            out.append(
                {
                    "feature": agg.name,
                    "view": view.name,
                    "entity": view.entity.name,
                    "entity_key": view.entity_key,
                    "source": view.source_name,
                    "aggregation": agg.kind,
                    "field": agg.field,
                    **({"q": agg.q} if agg.q is not None else {}),
                    "window": view.describe(),
                    "event_time": view.event_time,
                    "allowed_lateness_ms": view.allowed_lateness_ms,
                    "ttl_ms": view.ttl_ms,
                    "default": agg.default,
                }
            )
    return out


def view_named(project: Project, name: str) -> FeatureView:
    view = project.views.get(name)
    if view is None:
        raise FeatureError(f"no feature view {name!r} (views: {', '.join(project.views) or 'none'})")
    return view


def get_row(settings: CommonSettings, view: FeatureView, entity: str) -> dict[str, Any]:
    """One view's current values for one entity, as ``tide features get`` prints them."""
    from features.store import RedisOnlineStore

    async def read() -> dict[str, Any]:
        store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        try:
            (row,) = await store.read(view, [entity])
            return row.as_dict()
        finally:
            await store.close()

    return asyncio.run(read())


def version_listing(settings: CommonSettings, project: Project) -> list[dict[str, Any]]:
    """Every kept view version with its state and progress, as ``tide features versions`` prints them."""
    import redis

    from features.versions import read_states

    client = redis.Redis.from_url(settings.redis_url)
    try:
        states = read_states(client, settings.topic_prefix)
    finally:
        client.close()
    out = []
    for ref, view in sorted(project.view_versions.items()):
        state = states.get(ref)
        out.append(
            {
                "view": view.name,
                "version": view.version,
                "newest": project.views.get(view.name) == view,
                "state": state.state if state else "pending",
                "progress": {
                    p: {"position": a, "target": b} for p, (a, b) in (state.progress if state else {}).items()
                },
                "window": view.describe(),
            }
        )
    return out


def _training_model(project: Project, name: str | None) -> str:
    if name is not None:
        return name
    learning = [m.name for m in project.models.values() if m.labels is not None]
    if len(learning) != 1:
        raise FeatureError(f"pass --model NAME (models with labels: {', '.join(learning) or 'none'})")
    return learning[0]


def cmd_features(args: argparse.Namespace) -> int:
    if args.action == "run":
        if args.target:
            raise FeatureError(f"`tide features` takes no arguments, got {args.target}")
        from features.processor import run
        from features.settings import FeatureSettings

        return run_service(FeatureSettings, run)
    from schemas import registry

    settings = load(CommonSettings)
    project = registry.load(settings).project
    if args.action == "list":
        for line in feature_listing(project):
            emit(line)
        return 0
    if args.action == "get":
        if len(args.target) != 2:
            raise FeatureError("usage: tide features get VIEW ENTITY [--version N]")
        view_name, entity = args.target
        view = view_named(project, view_name)
        if args.version is not None:
            view = project.view_version(view_name, args.version)
        emit(get_row(settings, view, entity))
        return 0
    if args.action == "versions":
        for line in version_listing(settings, project):
            emit(line)
        return 0
    from features.training import from_topics

    model = _training_model(project, args.model)
    out = Path(args.out or f"out/training/{model}.avro")
    emit(from_topics(settings, project, model, out))
    return 0


def add_commands(add: AddCommand) -> None:
    fe = add(
        "features",
        cmd_features,
        "Run the online feature processor over every view the registry holds (default), `list` every "
        "feature, `get VIEW ENTITY` to print one view's current values for an entity as JSON, `versions` "
        "to show every kept view version with its state and backfill progress, or "
        "`training-set --model NAME --out FILE` to replay the topics into the model's point-in-time "
        "training set (Avro).",
    )
    fe.add_argument(
        "action", nargs="?", choices=("run", "list", "get", "versions", "training-set"), default="run"
    )
    fe.add_argument("target", nargs="*", metavar="VIEW ENTITY", help="`get`: the view and the entity's key")
    fe.add_argument(
        "--model", help="`training-set`: the model (default: the project's one model with labels)"
    )
    fe.add_argument("--out", help="`training-set` output (Avro; default out/training/MODEL.avro)")
    fe.add_argument("--version", type=int, help="`get`: a kept older version of the view (default: newest)")
