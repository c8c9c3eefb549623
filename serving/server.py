"""``tide serve``: the scoring app under uvicorn, serving every model of the applied definitions."""

from __future__ import annotations

import json
import logging
import os

import uvicorn

from infra.settings import env_var
from schemas.registry import load as load_definitions
from serving.app import create_app
from serving.metrics import multiprocess_dir
from serving.settings import ServeSettings

logger = logging.getLogger(__name__)

APP_FACTORY = "serving.app:create_app"


def _export_for_workers(settings: ServeSettings) -> None:
    """Put ``settings`` in the environment that worker processes inherit.

    With several workers uvicorn starts each in its own process, which builds its app with
    ``create_app()`` and so its settings from ``TIDE_*``; settings given on a command line must reach
    them the same way.
    """
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            os.environ.pop(env_var(name), None)
        else:  # lists and objects travel as JSON, which is how settings parse them back
            os.environ[env_var(name)] = value if isinstance(value, str) else json.dumps(value)


def run(settings: ServeSettings) -> None:
    """Serve until interrupted. One worker runs the app in this process; more run in child processes, each
    reading the definitions from the registry itself (read here first, so a missing apply fails now).
    Every worker follows the registry while it runs."""
    registered = load_definitions(settings)
    common: dict = {
        "host": settings.serve_host,
        "port": settings.serve_port,
        "log_level": settings.log_level.lower(),
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": 10,
    }
    logger.info(
        "serving project %s (definitions v%d, models %s) on http://%s:%d with %d worker(s)",
        registered.project.name,
        registered.version,
        ", ".join(sorted(registered.project.models)) or "none",
        settings.serve_host,
        settings.serve_port,
        settings.serve_workers,
    )
    if settings.serve_workers > 1:
        _export_for_workers(settings)
        with multiprocess_dir():  # workers' metrics in one directory, summed by /metrics
            uvicorn.run(APP_FACTORY, factory=True, workers=settings.serve_workers, **common)
    else:
        uvicorn.run(create_app(settings, definitions=registered), **common)
