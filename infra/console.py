"""Console plumbing shared by every command: JSON output, logging set-up, signals to a stop event.

Each package registers its commands with :data:`AddCommand` in its own ``commands.py``; :mod:`tide.cli`
assembles them into one ``tide`` parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from infra.settings import CommonSettings, load

Handler = Callable[[argparse.Namespace], int]
AddCommand = Callable[[str, Handler, str], argparse.ArgumentParser]
S = TypeVar("S", bound=CommonSettings)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )


def emit(obj: Any) -> None:
    """One JSON line on standard output."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def stop_event(stop: threading.Event | None = None) -> threading.Event:
    """A stop event that SIGTERM and SIGINT set (handlers are installed from the main thread only)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def run_service(settings_cls: type[S], run: Callable[[S], None]) -> int:
    """Build the service's settings (failing on a bad key), configure logging once, run it."""
    settings = load(settings_cls)
    setup_logging(settings.log_level)
    run(settings)
    return 0
