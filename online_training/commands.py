"""``tide train``, ``tide retrain`` and ``tide signing-key``: the trainers and the model-signing keys.

Registered into ``tide``'s parser by :func:`add_commands`. Light at import (the parser is built for every
``tide`` command); torch and onnxruntime are imported only when ``retrain`` runs.
"""

from __future__ import annotations

import argparse
import signal
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
    from infra.console import emit, setup_logging
    from infra.settings import load
    from online_training.batch import run
    from online_training.settings import RetrainSettings

    settings = load(RetrainSettings)
    setup_logging(settings.log_level)
    stop = threading.Event()
    if args.every is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    run(settings, every_s=args.every, stop=stop, on_result=emit)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from infra.console import run_service
    from online_training.trainer import TrainerSettings, run

    return run_service(TrainerSettings, run)


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
        "Run the online trainer: join labels with served features, learn, publish versions.",
    )
    rt = add(
        "retrain",
        cmd_retrain,
        "Batch-retrain: build a point-in-time training set from the events and labels topics, train a "
        "PyTorch MLP (CUDA when present, else CPU), check its ONNX export scores like torch, publish it as "
        "the next version of TIDE_RETRAIN_MODEL_NAME (default fraud-nn, flavor onnx). Prints one JSON "
        "summary per run.",
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
