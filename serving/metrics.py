"""Prometheus metrics of the scoring service, with one uvicorn worker or several.

With several workers each is its own process with its own metric values, and a scrape of ``/metrics``
reaches one of them at random. prometheus_client's multiprocess mode fixes that: every process writes
its values to files in one directory (``PROMETHEUS_MULTIPROC_DIR``) and ``/metrics`` sums the files of
all processes. Two rules follow:

- the variable must be set before a worker imports ``prometheus_client`` (the value class is chosen at
  import). uvicorn starts workers by spawning fresh interpreters that inherit the environment, so
  ``tide serve`` sets it, in the parent, around ``uvicorn.run`` (:func:`multiprocess_dir`);
- the directory must start empty on each run, or the previous run's counters are added in; it is a fresh
  temporary directory, removed when the server stops.

Counters and histograms are summed across processes as they are. A gauge needs a ``multiprocess_mode``
saying how to combine processes (``"max"``, ``"min"``, ``"sum"``, ``"all"`` per pid, ``"mostrecent"``;
the ``live*`` variants drop a process only once ``mark_process_dead`` is called for it, which uvicorn's
supervisor does not do, so prefer the plain ones). One worker: the default registry, nothing on disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger(__name__)

# prometheus_client's own switch, read by it at import; not a Tide setting, so not in ServeSettings.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def multiprocess_dir(parent: Path | None = None) -> Iterator[Path]:
    """A fresh, empty directory for the workers' metric files, exported as ``PROMETHEUS_MULTIPROC_DIR``
    to the processes started inside the block; the variable is restored and the directory removed after.

    Use it in the parent process around ``uvicorn.run(..., workers=N)``.
    """
    path = Path(tempfile.mkdtemp(prefix="tide-metrics-", dir=parent))
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(path)
    logger.info("multiprocess metrics in %s", path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def multiprocess_mode() -> bool:
    """Whether this process writes its metric values to a multiprocess directory."""
    return values.ValueClass is not values.MutexValue


def metrics_payload(directory: str | Path | None = None) -> tuple[bytes, str]:
    """The ``/metrics`` body and its content type.

    Sums every process's files in ``directory`` (default: ``PROMETHEUS_MULTIPROC_DIR`` when set), else
    exposes this process's default registry.
    """
    directory = directory or os.environ.get(MULTIPROC_ENV)
    if not directory:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()  # per scrape, as prometheus_client requires in this mode
    MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry), CONTENT_TYPE_LATEST
