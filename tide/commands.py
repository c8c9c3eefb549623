"""``tide up|down|status|topics``, ``tide init|plan|apply`` and ``tide demo``: the stack and the project."""

from __future__ import annotations

import argparse
from pathlib import Path

from infra.console import AddCommand, emit, setup_logging
from infra.errors import ConfigError
from infra.settings import CommonSettings, load


def cmd_up(args: argparse.Namespace) -> int:
    from infra.topics import ensure_topics
    from tide.embedded import EmbeddedStack, read_state

    settings = load(CommonSettings)
    if read_state(settings.state_dir):
        emit({"status": "already running", **(read_state(settings.state_dir) or {})})
        return 0
    info = EmbeddedStack(settings.state_dir, kafka_port=args.kafka_port, redis_port=args.redis_port).start()
    ensure_topics(info.settings())
    emit(
        {
            "kafka_bootstrap": info.kafka_bootstrap,
            "redis_url": info.redis_url,
            "broker_pid": info.broker_pid,
            "redis_pid": info.redis_pid,
        }
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from tide.embedded import stop_stack

    emit({"stopped": stop_stack(load(CommonSettings).state_dir)})
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tide.embedded import stack_status

    emit(stack_status(load(CommonSettings).state_dir))
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from infra.topics import ensure_topics

    ensure_topics(load(CommonSettings), replication_factor=args.replication_factor)
    return 0


def project_dir(args: argparse.Namespace, settings: CommonSettings) -> Path:
    """``--project``, else ``TIDE_PROJECT``."""
    folder = getattr(args, "project", None) or settings.project
    if folder is None:
        raise ConfigError("no project: pass --project DIR or set TIDE_PROJECT")
    return Path(folder)


def cmd_init(args: argparse.Namespace) -> int:
    from tide.scaffold import scaffold

    emit({"created": [str(p) for p in scaffold(Path(args.dir))]})
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tide.plan import plan
    from tide.project import load_project

    settings = load(CommonSettings)
    emit(plan(settings, load_project(project_dir(args, settings))).as_dict())
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from tide.plan import apply
    from tide.project import load_project

    settings = load(CommonSettings)
    setup_logging(settings.log_level)
    project = load_project(project_dir(args, settings))
    emit(
        apply(
            settings,
            project,
            replication_factor=args.replication_factor,
            allow_breaking=args.allow_breaking,
        )
    )
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from schemas import registry

    found = registry.latest(load(CommonSettings))
    if found is None:
        raise ConfigError("no definitions applied in this namespace: run 'tide apply' first")
    emit(
        {
            "project": found.project.name,
            "version": found.version,
            "digest": found.digest,
            "applied_by": found.applied_by,
            "ts": found.ts,
            "body": found.project.to_dict(),
        }
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tide.compare import run_compare
    from tide.demo import DemoConfig, run_demo

    setup_logging("INFO")
    options: dict[str, str] = {}
    for option in args.option:
        key, sep, value = option.partition("=")
        if not sep:
            raise ConfigError(f"--option {option!r}: expected KEY=VALUE")
        options[key] = value
    cfg = DemoConfig(
        project=project_dir(args, load(CommonSettings)),
        duration_s=args.duration,
        rate=args.rate,
        out_dir=Path(args.out),
        publish_every=args.publish_every,
        seed=args.seed,
        options=options,
        reactions=args.reactions == "on",
    )
    report = run_compare(cfg) if args.compare else run_demo(cfg)
    emit({"report": str(Path(args.out) / "report.json"), "ok": report["ok"], "problems": report["problems"]})
    return 0 if report["ok"] else 1


def add_commands(add: AddCommand) -> None:
    up = add(
        "up", cmd_up, "Start the embedded Kafka-protocol broker and Redis on 127.0.0.1 and create the topics."
    )
    up.add_argument("--kafka-port", type=int, default=None, help="broker port (default: a free port)")
    up.add_argument("--redis-port", type=int, default=None, help="Redis port (default: a free port)")
    add("down", cmd_down, "Stop the embedded stack started by `tide up` (by PID).")
    add("status", cmd_status, "Show whether the embedded broker and Redis are running and answering.")
    tp = add("topics", cmd_topics, "Create Tide's own topics with their partition counts (idempotent).")
    tp.add_argument("--replication-factor", type=int, default=1)
    it = add("init", cmd_init, "Scaffold a working project in DIR: a source, labels, a view and a model.")
    it.add_argument("dir", help="the new project's folder (must not exist or be empty)")
    for name, fn, help_ in (
        (
            "plan",
            cmd_plan,
            "Validate the project's definitions (references, schema fields and types, schema compatibility "
            "with registered versions, learner factories on a sample record) and print what apply would do.",
        ),
        (
            "apply",
            cmd_apply,
            "Plan, then create the sources' topics and register the definitions (with their content "
            "digest) in the registry every service reads.",
        ),
    ):
        sp = add(name, fn, help_)
        sp.add_argument("--project", default=None, help="project folder (default: TIDE_PROJECT)")
        if name == "apply":
            sp.add_argument("--replication-factor", type=int, default=1, help="of the topics apply creates")
            sp.add_argument(
                "--allow-breaking",
                action="store_true",
                help="apply breaking changes too (each is listed by plan; a changed view gets a new "
                "version, backfilled while the running one keeps serving)",
            )
    add(
        "registry",
        cmd_registry,
        "Print the definitions every service runs (the newest applied version, with its digest) as JSON.",
    )
    de = add(
        "demo",
        cmd_demo,
        "Run a project's whole loop on a private embedded stack, driven by the project's driver/ package, "
        "and write a report and a plot to out/demo/.",
    )
    de.add_argument("--project", default=None, help="project folder (default: TIDE_PROJECT)")
    de.add_argument("--duration", type=float, default=90.0, help="seconds of traffic (default 90)")
    de.add_argument("--rate", type=float, default=200.0, help="events per second (default 200)")
    de.add_argument("--out", default="out/demo", help="report directory")
    de.add_argument("--publish-every", type=int, default=None, help="labels per model version (all models)")
    de.add_argument("--seed", type=int, default=7)
    de.add_argument(
        "--reactions",
        choices=("on", "off"),
        default="on",
        help="off: every model's policy only reports (no promote, rollback or retraining on alerts)",
    )
    de.add_argument(
        "--compare",
        action="store_true",
        help="run with reactions on, then off, and compare how the online metric recovered (out/on, out/off)",
    )
    de.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a driver setting")
