"""``tide train``, ``tide retrain`` and ``tide signing-key``: the trainers and the model-signing keys.

Registered into ``tide``'s parser by :func:`add_commands`. Light at import (the parser is built for every
``tide`` command); torch and onnxruntime are imported only when ``retrain`` runs.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from infra.console import AddCommand
from infra.errors import DefinitionError


def _duration_s(text: str) -> float:
    from schemas.definitions import duration_ms

    try:
        return duration_ms(text, "--every") / 1000
    except DefinitionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_retrain(args: argparse.Namespace) -> int:
    from infra.console import emit, setup_logging, stop_event
    from infra.settings import load
    from online_training.batch import run
    from online_training.settings import RetrainSettings
    from schemas import registry

    settings = load(RetrainSettings)
    setup_logging(settings.log_level)
    stop = stop_event() if args.every is not None else threading.Event()
    run(settings, registry.load(settings).project, every_s=args.every, stop=stop, on_result=emit)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from infra.console import run_service, stop_event
    from online_training.settings import TrainerSettings
    from online_training.trainer import run
    from schemas import registry

    stop = stop_event()
    return run_service(TrainerSettings, lambda settings: run(settings, registry.load(settings).project, stop))


def cmd_signing_key(args: argparse.Namespace) -> int:
    from infra.console import emit
    from models.signing import generate_key_pair

    emit(generate_key_pair(Path(args.out)))
    return 0


def add_commands(add: AddCommand) -> None:
    """Add ``train``, ``retrain`` and ``signing-key`` with ``add(name, handler, help)``."""
    add(
        "train",
        cmd_train,
        "Run the online trainer: every model with a learner learns from its labels (joined with the inputs "
        "served for their events, or point-in-time features replayed for events never scored), "
        "progressively, and publishes versions (flavor river). Follows the registry and the view versions "
        "made live: a model applied while it runs is trained (history first), a changed one starts a new "
        "lineage, a removed one stops. A drift alert a model's retrain policy lists refreshes it (a fresh "
        "learner warmed on its recent labels); every version is blessed against the champion.",
    )
    rt = add(
        "retrain",
        cmd_retrain,
        "Batch-retrain every model with a batch trainer: point-in-time training rows replayed from the "
        "topics, its torch module trained (CUDA when present, else CPU), its ONNX export checked to score "
        "like torch, published as the model's next version (flavor onnx). Prints one JSON summary per "
        "model and run. With --every it follows the registry (models applied meanwhile are retrained at "
        "once) and retrains a model at once on a drift alert its retrain policy lists. Every version is "
        "blessed against the champion on the newest held-out labels (unblessed ones never serve).",
    )
    rt.add_argument(
        "--every",
        type=_duration_s,
        default=None,
        metavar="DURATION",
        help="run again every DURATION (e.g. 10m, 1h) until stopped; default: once",
    )
    sk = add(
        "signing-key",
        cmd_signing_key,
        "`signing-key new --out DIR`: make an Ed25519 key pair for signing model versions. Trainers sign "
        "with TIDE_SIGNING_KEY_FILE=DIR/signing-key.pem; serving trusts TIDE_SERVE_TRUSTED_KEYS_FILE="
        "DIR/signing-key.pub.pem. Never overwrites a key.",
    )
    sk.add_argument("action", choices=("new",))
    sk.add_argument("--out", required=True, help="directory for signing-key.pem and signing-key.pub.pem")
