"""The definitions a serving node runs, and how it follows the registry while it runs.

:class:`Catalog` is what a node derives once from one version of the definitions: each model's inputs
and request schema, and the OpenAPI document. It is immutable; a change of definitions builds a new one
aside and the service swaps its reference in one assignment.

:class:`DefinitionsWatch` follows the registry (``schemas.registry.Follower`` / ``follow``) on a daemon
thread and hands every newer accepted version to a callback, so a model applied while the node runs is
served within seconds, without a restart. Every worker process of ``tide serve`` runs its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

from infra.settings import CommonSettings
from models.inputs import ModelInputs, model_inputs
from schemas.definitions import Project
from schemas.registry import Follower, Registered, follow
from serving.openapi import openapi_document
from serving.settings import ServeSettings
from serving.validation import RequestSchema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Catalog:
    """One version of the definitions as a node serves them."""

    project: Project
    version: int | None  # the registry version (None: definitions passed in, not read from the registry)
    inputs: Mapping[str, ModelInputs]  # by model name, as the model is defined now
    schemas: Mapping[str, RequestSchema]  # by model name
    openapi: bytes  # the /openapi.json body
    auth_enabled: bool

    @classmethod
    def build(
        cls, settings: ServeSettings, project: Project, *, version: int | None, auth_enabled: bool
    ) -> Catalog:
        inputs = model_inputs(project)
        schemas = {name: RequestSchema(i) for name, i in inputs.items()}
        document = openapi_document(settings, auth_enabled=auth_enabled, models=schemas)
        return cls(project, version, inputs, schemas, orjson.dumps(document), auth_enabled)


FollowerFactory = Callable[[CommonSettings], Follower]


class DefinitionsWatch:
    """Calls ``on_change`` (on a daemon thread) with every accepted version of the definitions newer
    than ``since`` (the version the node started with)."""

    RETRY_S = 1.0

    def __init__(
        self,
        settings: CommonSettings,
        on_change: Callable[[Registered], None],
        *,
        since: int,
        interval_s: float = 0.5,
        follower_factory: FollowerFactory = Follower,
    ) -> None:
        self.settings = settings
        self._on_change = on_change
        self._since = since
        self._interval_s = interval_s
        self._factory = follower_factory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._follow: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tide-definitions-watch", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in (self._thread, self._follow):
            if thread is not None:
                thread.join(timeout)
        self._thread = self._follow = None

    @property
    def following(self) -> bool:
        """Whether the registry is being followed now."""
        return self._follow is not None and self._follow.is_alive()

    def _run(self) -> None:
        watcher: Follower | None = None
        while watcher is None and not self._stop.is_set():
            try:  # reads the registry to its end: here, not in the service's start-up
                watcher = self._factory(self.settings)
            except Exception:
                logger.exception("cannot follow the registry; retrying")
                self._stop.wait(self.RETRY_S)
        if watcher is None:
            return
        current = watcher.current
        # Applied between the node's start and now: take it up before following.
        if current.version > self._since:
            try:
                self._on_change(current)
            except Exception:
                logger.exception("definitions version %d could not be taken up", current.version)
        self._follow = follow(
            self.settings, self._on_change, self._stop, interval_s=self._interval_s, follower=watcher
        )
