"""``tide``: the command line in front of every part of the loop.

Each subcommand builds its service's settings from ``TIDE_*`` variables (failing with the key's name on a
bad value), configures logging once and hands over to the package that owns the work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infra.errors import TideError
from infra.settings import CommonSettings, S, load

log = logging.getLogger("tide")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


# --- embedded stack ---------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from infra.embedded import EmbeddedStack, read_state
    from streams.topics import ensure_topics

    settings = load(CommonSettings)
    if read_state(settings.state_dir):
        _emit({"status": "already running", **(read_state(settings.state_dir) or {})})
        return 0
    info = EmbeddedStack(settings.state_dir, kafka_port=args.kafka_port, redis_port=args.redis_port).start()
    ensure_topics(info.settings())
    _emit(
        {
            "kafka_bootstrap": info.kafka_bootstrap,
            "redis_url": info.redis_url,
            "broker_pid": info.broker_pid,
            "redis_pid": info.redis_pid,
        }
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from infra.embedded import stop_stack

    stopped = stop_stack(load(CommonSettings).state_dir)
    _emit({"stopped": stopped})
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from infra.embedded import stack_status

    status = stack_status(load(CommonSettings).state_dir)
    _emit(status)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from streams.topics import ensure_topics

    ensure_topics(load(CommonSettings), replication_factor=args.replication_factor)
    return 0


# --- data in and out --------------------------------------------------------------------------------


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.produce import produce_file, produce_generated

    settings = load(CommonSettings)
    if args.file:
        stats = produce_file(settings, Path(args.file))
    elif args.score_url:
        from streams.traffic import TrafficConfig, drive

        cfg = TrafficConfig(
            events=args.count,
            rate=args.rate,
            drift_at=args.drift_at,
            label_delay=args.label_delay,
            seed=args.seed,
        )
        stats = asyncio.run(drive(cfg, settings, args.score_url.rstrip("/"))).summary()
    else:
        stats = produce_generated(
            settings,
            count=args.count,
            rate=args.rate,
            drift_at=args.drift_at,
            label_delay=args.label_delay,
            seed=args.seed,
        )
    _emit(stats)
    return 1 if stats.get("rejected") or stats.get("non_2xx") else 0


def cmd_tail(args: argparse.Namespace) -> int:
    from streams.tail import tail

    settings = load(CommonSettings)
    for record in tail(settings, args.topic, max_records=args.max, follow=args.follow):
        _emit(record)
    return 0


# --- services ---------------------------------------------------------------------------------------


def _service(settings_cls: type[S], run: Callable[[S], None]) -> int:
    """Build the service's settings (failing on a bad key), configure logging once, run it."""
    settings = load(settings_cls)
    _setup_logging(settings.log_level)
    run(settings)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import run
    from serving.settings import ServeSettings

    return _service(ServeSettings, run)


def cmd_deploy(args: argparse.Namespace) -> int:
    from serving.deployments import deployment_record, publish_deployment

    settings = load(CommonSettings)
    model = args.model or settings.model_name
    record = deployment_record(model, args.action, args.version, args.weight, args.reason)
    publish_deployment(settings, record)
    _emit(record)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from features.definitions import VIEWS

    if args.action == "list":
        for view in VIEWS.values():
            for agg in view.aggregations:
                _emit(
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

        _emit({"entity": args.entity, "views": asyncio.run(read())})
        return 0
    if args.action == "training-set":
        from features.training import from_topics

        _emit(from_topics(load(CommonSettings), list(VIEWS.values()), Path(args.out)))
        return 0
    from features.processor import run
    from features.settings import FeatureSettings

    return _service(FeatureSettings, run)


def cmd_train(args: argparse.Namespace) -> int:
    from online_training.trainer import TrainerSettings, run

    return _service(TrainerSettings, run)


def cmd_drift(args: argparse.Namespace) -> int:
    from streams.drift import DriftSettings, run

    return _service(DriftSettings, run)


def cmd_demo(args: argparse.Namespace) -> int:
    from infra.demo import DemoConfig, run_demo

    _setup_logging("INFO")
    report = run_demo(DemoConfig(duration_s=args.duration, out_dir=Path(args.out), rate=args.rate))
    _emit({"report": str(Path(args.out) / "report.json"), "ok": report["ok"]})
    return 0 if report["ok"] else 1


# --- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tide",
        description="Tide: Kafka events to Redis features, online training, hot-swapped HTTP scoring and "
        "drift alerts. Settings come from TIDE_* environment variables (TIDE_KAFKA_BOOTSTRAP, "
        "TIDE_REDIS_URL, TIDE_TOPIC_PREFIX, ...); with `tide up` running, its addresses are the defaults.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    up = add(
        "up", cmd_up, "Start the embedded Kafka-protocol broker and Redis on 127.0.0.1 and create the topics."
    )
    up.add_argument("--kafka-port", type=int, default=None, help="broker port (default: a free port)")
    up.add_argument("--redis-port", type=int, default=None, help="Redis port (default: a free port)")
    add("down", cmd_down, "Stop the embedded stack started by `tide up` (by PID).")
    add("status", cmd_status, "Show whether the embedded broker and Redis are running and answering.")
    tp = add("topics", cmd_topics, "Create the loop's topics with their partition counts (idempotent).")
    tp.add_argument("--replication-factor", type=int, default=1)

    pr = add(
        "produce",
        cmd_produce,
        "Produce card-transaction events (and their late labels) to Kafka, from "
        "the built-in generator or a JSONL file.",
    )
    pr.add_argument("--file", help='JSONL file: one event per line, or {"label": {...}} lines for labels')
    pr.add_argument("--count", type=int, default=10_000, help="generated events (default 10000)")
    pr.add_argument("--rate", type=float, default=0.0, help="events per second; 0 = as fast as possible")
    pr.add_argument("--drift-at", type=int, default=None, help="inject drift from this record index on")
    pr.add_argument("--label-delay", type=int, default=200, help="labels arrive this many events later")
    pr.add_argument("--seed", type=int, default=7)
    pr.add_argument(
        "--score-url",
        help="scoring service base URL (e.g. http://127.0.0.1:8000): score each event there before producing "
        "it, as an application would at authorisation; the prediction log is what the trainer learns from",
    )

    tl = add(
        "tail",
        cmd_tail,
        "Print a topic's records decoded, one JSON line each, from the beginning to its end.",
    )
    tl.add_argument(
        "topic",
        help="topic name without prefix: events, labels, predictions, models, deployments, "
        "drift-alerts, dead-letter",
    )
    tl.add_argument("--max", type=int, default=None, help="stop after this many records")
    tl.add_argument("--follow", "-f", action="store_true", help="keep waiting for new records")

    add(
        "serve",
        cmd_serve,
        "Run the HTTP scoring service (POST /v1/models/{name}/score); follows the models "
        "topic and hot-swaps versions.",
    )
    dp = add(
        "deploy",
        cmd_deploy,
        "Change which model version serves: promote VERSION to champion, canary VERSION --weight W "
        "(sticky per entity; weight 0 ends it), shadow VERSION (mirrored and logged; no version ends it), "
        "rollback (to the previous champion, or VERSION), follow (the newest version serves). Published "
        "to the deployments topic; every serving node applies it.",
    )
    dp.add_argument("action", choices=("promote", "canary", "shadow", "rollback", "follow"))
    dp.add_argument("version", nargs="?", type=int, default=None, help="model version the action applies to")
    dp.add_argument("--weight", type=float, default=0.0, help="canary share of entities in [0, 1]")
    dp.add_argument("--model", default=None, help="model name (default: TIDE_MODEL_NAME)")
    dp.add_argument("--reason", default=None, help="why, kept with the record")
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
    add(
        "train",
        cmd_train,
        "Run the online trainer: join labels with served features, learn, publish versions.",
    )
    from online_training.commands import add_commands

    add_commands(add)  # retrain, signing-key
    add(
        "drift", cmd_drift, "Run the drift scorer: compare live inputs and scores with the model's reference."
    )
    de = add("demo", cmd_demo, "Run the whole loop on the embedded stack and write a report to out/demo/.")
    de.add_argument("--duration", type=float, default=90.0, help="seconds of traffic (default 90)")
    de.add_argument("--rate", type=float, default=200.0, help="events per second (default 200)")
    de.add_argument("--out", default="out/demo", help="report directory")
    ke = add(
        "keys",
        cmd_keys,
        "`keys new`: make an API key for `tide serve`. Prints the key (shown once, never stored) and the "
        "entry to add to TIDE_SERVE_API_KEYS or the TIDE_SERVE_API_KEYS_FILE list (only its sha256).",
    )
    ke.add_argument("action", choices=("new",))
    ke.add_argument("--name", required=True, help="the key's name, for logs (e.g. the client's)")
    ke.add_argument("--roles", default="score", help="comma-separated: score, admin (default score)")
    return p


def cmd_keys(args: argparse.Namespace) -> int:
    from serving.auth import new_key

    key, entry = new_key(args.name, [r.strip() for r in args.roles.split(",") if r.strip()])
    _emit({"key": key, "entry": entry.model_dump(mode="json")})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "features" and args.action == "get" and not args.entity:
        build_parser().error("features get needs an ENTITY")
    try:
        return int(args.fn(args))
    except TideError as exc:
        field = getattr(exc, "field", None)  # request errors name their field apart from the message
        where = f"{field}: " if field else ""
        sys.stderr.write(f"tide {args.command}: error: {where}{exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
