"""``tide produce``, ``tide tail``, ``tide drift`` and ``tide judge``: data in and out, the drift scorer
and the canary judge.

Each loads the project's definitions from the registry (``schemas.registry.load``) and passes them down;
``tide drift`` also follows the registry while it runs (a model applied later is watched without a
restart).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infra.console import AddCommand, emit, run_service, setup_logging, stop_event
from infra.settings import CommonSettings, load
from infra.topics import TOPICS


def _stderr(line: object) -> None:
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def cmd_produce(args: argparse.Namespace) -> int:
    from schemas import registry
    from streams.produce import produce_file
    from streams.sources import find_source

    settings = load(CommonSettings)
    setup_logging(settings.log_level)
    source = find_source(registry.load(settings).project, args.source)
    summary = produce_file(
        settings,
        source,
        Path(args.file),
        fmt=args.format,
        on_progress=None if args.quiet else _stderr,
        on_rejected=_stderr,
        progress_every_s=args.progress_every,
    )
    emit(summary)
    return 1 if summary["rejected_count"] else 0


def cmd_tail(args: argparse.Namespace) -> int:
    from schemas import registry
    from streams.tail import tail

    settings = load(CommonSettings)
    # Tide's own topics need no definitions (the registry itself, or dead letters before any apply).
    project = None if args.topic in TOPICS else registry.load(settings).project
    for record in tail(settings, args.topic, project=project, max_records=args.max, follow=args.follow):
        emit(record)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from schemas import registry
    from streams.drift import DriftSettings
    from streams.drift_service import run

    stop = stop_event()
    return run_service(DriftSettings, lambda settings: run(settings, registry.load(settings).project, stop))


def cmd_judge(args: argparse.Namespace) -> int:
    from schemas import registry
    from streams.judge import JudgeSettings
    from streams.judge_service import run

    stop = stop_event()
    return run_service(JudgeSettings, lambda settings: run(settings, registry.load(settings).project, stop))


def add_commands(add: AddCommand) -> None:
    pr = add(
        "produce",
        cmd_produce,
        "Produce a file of records to a source's topic, keyed by the source's key field. Every record is "
        "checked against the source's registered schema first (types, defaults, nulls, finite numbers); "
        "when any is bad, each is reported with its line (record number for Avro) and nothing is sent. "
        "Progress goes to stderr, a JSON summary to stdout; exit status 1 when records were rejected.",
    )
    pr.add_argument("source", help="the source's name, or its topic (without the prefix)")
    pr.add_argument(
        "--file",
        required=True,
        help="JSON Lines (.jsonl, .ndjson, .json), CSV with a header row (.csv) or an Avro container (.avro)",
    )
    pr.add_argument(
        "--format",
        choices=("jsonl", "csv", "avro"),
        default=None,
        help="the file's format (default: by its name)",
    )
    pr.add_argument(
        "--progress-every", type=float, default=1.0, help="seconds between progress lines (default 1)"
    )
    pr.add_argument(
        "--quiet", "-q", action="store_true", help="no progress lines (bad records are still listed)"
    )

    tl = add(
        "tail",
        cmd_tail,
        "Print a topic's records decoded, one JSON line each, from the beginning to its end.",
    )
    tl.add_argument(
        "topic",
        help=f"a source's name or topic, or one of Tide's topics ({', '.join(TOPICS)}); no prefix",
    )
    tl.add_argument("--max", type=int, default=None, help="stop after this many records")
    tl.add_argument("--follow", "-f", action="store_true", help="keep waiting for new records")

    add(
        "drift",
        cmd_drift,
        "Run the drift scorer: every model's monitored inputs and output compared with the reference "
        "profile of its version (PSI over a sliding window); alerts go to the drift-alerts topic. Follows "
        "the registry: models applied while it runs are watched, removed ones dropped.",
    )
    add(
        "judge",
        cmd_judge,
        "Run the canary and shadow judge: labels joined with predictions per model, version and arm; "
        "shadows compared paired, canaries unpaired, with an always-valid confidence sequence, a "
        "non-inferiority margin and guardrails. Verdicts go to the canary-verdicts topic; the model's "
        "policy may promote a pass or end a failed candidate (deployments). Concept-drift alerts from the "
        "champion's losses go to drift-alerts. Exactly once across restarts; follows the registry.",
    )
