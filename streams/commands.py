"""``tide produce``, ``tide tail`` and ``tide drift``: data in and out, and the drift scorer."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from infra.console import AddCommand, emit, run_service
from infra.settings import CommonSettings, load


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.produce import produce_file, produce_generated

    settings = load(CommonSettings)
    if args.file:
        stats = produce_file(settings, Path(args.file))
    elif args.score_url:
        from examples.fraud.driver.traffic import TrafficConfig, drive

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
    emit(stats)
    return 1 if stats.get("rejected") or stats.get("non_2xx") else 0


def cmd_tail(args: argparse.Namespace) -> int:
    from streams.tail import tail

    settings = load(CommonSettings)
    for record in tail(settings, args.topic, max_records=args.max, follow=args.follow):
        emit(record)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from streams.drift import DriftSettings, run

    return run_service(DriftSettings, run)


def add_commands(add: AddCommand) -> None:
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
        "drift", cmd_drift, "Run the drift scorer: compare live inputs and scores with the model's reference."
    )
