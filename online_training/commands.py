"""``tide retrain`` and ``tide signing-key``: the batch retrainer and the model-signing keys.

Registered into ``tide``'s parser by :func:`add_commands`. Light at import (the parser is built for every
``tide`` command); torch and onnxruntime are imported only when ``retrain`` runs.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from infra.errors import FeatureError

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _duration_s(text: str) -> float:
    from features.definitions import duration_ms

    try:
        return duration_ms(text, "--every") / 1000
    except FeatureError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_retrain(args: argparse.Namespace) -> int:
    from infra.cli import _emit, _setup_logging
    from infra.settings import load
    from online_training.batch import run
    from online_training.settings import RetrainSettings

    settings = load(RetrainSettings)
    _setup_logging(settings.log_level)
    stop = threading.Event()
    if args.every is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    run(settings, every_s=args.every, stop=stop, on_result=_emit)
    return 0


def cmd_signing_key(args: argparse.Namespace) -> int:
    from infra.cli import _emit
    from infra.signing import generate_key_pair

    _emit(generate_key_pair(Path(args.out)))
    return 0


def add_commands(add: AddCommand) -> None:
    """Add ``retrain`` and ``signing-key`` with ``add(name, handler, help)`` (infra.cli's helper)."""
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
