"""``tide features``: the online feature processor and its read-outs."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from infra.console import AddCommand, emit, run_service
from infra.settings import CommonSettings, load


def cmd_features(args: argparse.Namespace) -> int:
    from schemas.definitions import VIEWS

    if args.action == "list":
        for view in VIEWS.values():
            for agg in view.aggregations:
                emit(
                    {
                        "feature": agg.name,
                        "view": view.name,
                        "entity": view.entity,
                        "source": view.source,
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
        return 0
    if args.action == "get":
        from features.store import RedisOnlineStore

        settings = load(CommonSettings)

        async def read() -> dict[str, Any]:
            store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
            try:
                rows = await store.read_many(list(VIEWS.values()), [args.entity])
                return {name: found[0].as_dict() for name, found in rows.items()}
            finally:
                await store.close()

        emit({"entity": args.entity, "views": asyncio.run(read())})
        return 0
    if args.action == "training-set":
        from features.training import from_topics

        emit(from_topics(load(CommonSettings), list(VIEWS.values()), Path(args.out)))
        return 0
    from features.processor import run
    from features.settings import FeatureSettings

    return run_service(FeatureSettings, run)


def add_commands(add: AddCommand) -> None:
    fe = add(
        "features",
        cmd_features,
        "Run the online feature processor (default), or `list` the definitions, `get ENTITY` to print an "
        "entity's current values as JSON, or `training-set --out FILE` to replay the events and labels "
        "topics into a point-in-time training set (Avro).",
    )
    fe.add_argument("action", nargs="?", choices=("run", "list", "get", "training-set"), default="run")
    fe.add_argument("entity", nargs="?", help="entity key for `get`")
    fe.add_argument("--out", default="out/training/training_set.avro", help="`training-set` output (Avro)")
