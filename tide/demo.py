"""``tide demo``: any project's whole loop on the embedded stack, driven by the project's own traffic.

:func:`run_demo` starts a private broker and Redis, applies the project (:func:`tide.plan.apply`: its
topics and the registry), starts ``tide features``, ``tide train``, ``tide drift`` and ``tide serve`` as
processes with ``TIDE_PROJECT`` set to the project folder, and hands over to the project's driver. When
the driver returns, it reads back what the loop recorded (:mod:`tide.report`) and writes
``report.json`` and ``loop.png`` into the output folder, with each service's log under ``logs/``.

The driver convention
---------------------
A project that can be demonstrated has a ``driver`` package beside its definitions. It is a folder, so
the project loader (which imports top-level ``*.py`` files only) never imports it; the demo imports it
under a name of its own, so the drivers of several projects never collide::

    my_project/
        definitions.py  my_model.py  schemas/
        driver/__init__.py      def run(demo: tide.demo.Demo) -> dict[str, Any]

``run(demo)`` plays the project's world for ``demo.duration_s`` seconds at ``demo.rate`` request events
per second (``demo.events`` in all): it produces the sources' records, scores request events over HTTP
at ``demo.scoring_url(model)`` with serving's request body, produces labels when they become known, and
returns its own section of the report (JSON-serialisable). It may block; it may run an event loop.

:class:`Demo` gives the driver:

- ``settings``, ``project`` (the applied definitions), ``client`` (a :class:`tide.Client` of the demo's
  namespace), ``serve_url`` and ``scoring_url(model)``;
- ``duration_s``, ``rate``, ``events``, ``seed``, ``concurrency`` (scoring requests in flight) and
  ``option(name, default)`` for driver-specific settings (``DemoConfig.options``);
- ``produce(source, record)``: non-blocking, batched through ``client.produce`` on a background thread
  (records of one source keep their order); ``flush()`` waits until everything is acknowledged;
- ``watch_freshness(view, entity, event_ts)``: a sampled probe of event time to visible in the online
  store; ``wait_visible(view, {entity: event_ts})`` waits until the store has applied such events (after
  a warm-up, say);
- ``out_dir``, where a driver may write files of its own.

Keys of the returned section the runner reads (all optional):

- ``ok``: the driver's own verdict, and-ed into the report's;
- ``drift_injected_at``: the index (among scored request events) where the driver changed the world;
  the report then checks drift alerts come after it and none before;
- ``baselines``: ``{model: value}``, a naive predictor's value of the model's metric, drawn beside the
  online metric;
- ``errors``: what went wrong, as strings.

The section lands under ``"driver"`` in ``report.json``; everything else there is generic (see
:mod:`tide.report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx

from features.store import RedisOnlineStore
from infra.errors import ConfigError, StackError, StreamError
from infra.settings import CommonSettings
from infra.topics import ensure_topics
from schemas.definitions import Project
from tide.embedded import EmbeddedStack, StackInfo, free_port
from tide.processes import SERVICES, Services, wait_until
from tide.report import build_report, write_plot

if TYPE_CHECKING:
    from tide.client import Client

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DemoConfig:
    project: Path | None = None  # the project folder (the CLI: --project, else TIDE_PROJECT)
    duration_s: float = 90.0
    rate: float = 200.0  # request events per second
    out_dir: Path = Path("out/demo")
    publish_every: int | None = None  # labels per model version, for every model (None: as declared)
    concurrency: int = 32  # scoring requests in flight
    seed: int = 7
    options: Mapping[str, Any] = field(default_factory=dict)  # the driver's own settings
    ready_timeout_s: float = 60.0

    @property
    def events(self) -> int:
        return int(self.duration_s * self.rate)

    @property
    def folder(self) -> Path:
        if self.project is None:
            raise ConfigError("no project to demonstrate: pass --project DIR or set TIDE_PROJECT")
        return self.project


@dataclass(frozen=True)
class DemoContext:
    """Handed to an inspection hook after the driver returned, while every service still runs."""

    settings: CommonSettings
    stack: StackInfo
    project: Project
    serve_url: str
    section: dict[str, Any]  # what the driver returned


class Outbox:
    """Records queued by a driver and produced in batches through ``client.produce`` on one thread."""

    def __init__(self, client: Client, max_batch: int = 5000) -> None:
        self._client = client
        self._queue: queue.Queue[tuple[str, Mapping[str, Any]] | None] = queue.Queue()
        self._max = max_batch
        self.produced: dict[str, int] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-outbox", daemon=True)
        self._thread.start()

    def put(self, source: str, record: Mapping[str, Any]) -> None:
        self._raise()
        self._queue.put((source, record))

    def _raise(self) -> None:
        if self.error is not None:
            raise StreamError(f"producing to the sources failed: {self.error}") from self.error

    def _take(self) -> tuple[dict[str, list[Mapping[str, Any]]], int, bool]:
        """What is queued (waiting for the first), grouped by source in order, how many items were
        taken, and whether the outbox was closed."""
        batches: dict[str, list[Mapping[str, Any]]] = {}
        item = self._queue.get()
        taken = 1
        while item is not None:
            batches.setdefault(item[0], []).append(item[1])
            if taken >= self._max:
                return batches, taken, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batches, taken, False
            taken += 1
        return batches, taken, True

    def _run(self) -> None:
        closed = False
        while not closed:
            batches, taken, closed = self._take()
            for source, records in batches.items():
                try:
                    self._client.produce(source, records)
                except Exception as exc:  # the driver learns of it on its next put, flush or close
                    log.exception("producing %d records to %s failed", len(records), source)
                    self.error = exc
                    return
                self.produced[source] = self.produced.get(source, 0) + len(records)
            for _ in range(taken):
                self._queue.task_done()

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every record queued so far is acknowledged; raises if producing failed."""
        deadline = time.monotonic() + timeout_s
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StreamError(f"queued records not acknowledged in {timeout_s:.0f} s")
                done.wait(min(left, 0.1))
        self._raise()

    def close(self, timeout_s: float = 60.0) -> None:
        """Produce what is queued and stop; raises if anything failed."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise StreamError(f"the outbox did not drain in {timeout_s:.0f} s")
        self._raise()


class FreshnessProbe:
    """Event time to visible in the online store, for sampled events, polled on a thread of its own.

    Each poll reads every watched entity's row of each view in one store read; an event is visible once
    the entity's newest event time in the store has reached it.
    """

    def __init__(self, settings: CommonSettings, project: Project, timeout_s: float = 5.0) -> None:
        self._settings, self._project, self._timeout_ms = settings, project, timeout_s * 1000
        self._pending: list[tuple[str, str, int]] = []  # (view, entity, event time)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.freshness_ms: list[float] = []
        self.timed_out: list[str] = []
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._run()), name="demo-probe", daemon=True
        )
        self._thread.start()

    def watch(self, view: str, entity: str, event_ts: int) -> None:
        if view not in self._project.views:
            raise ConfigError(f"no feature view {view!r} (views: {', '.join(self._project.views)})")
        with self._lock:
            self._pending.append((view, entity, event_ts))

    async def _run(self) -> None:
        store = RedisOnlineStore.from_url(self._settings.redis_url, self._settings.topic_prefix)
        try:
            while not self._stop.is_set() or self._pending:
                with self._lock:
                    pending, self._pending = self._pending, []
                if pending:
                    await self._poll(store, pending)
                await asyncio.sleep(0.005)
        finally:
            await store.close()

    async def _poll(self, store: RedisOnlineStore, pending: list[tuple[str, str, int]]) -> None:
        by_view: dict[str, list[str]] = {}
        for view, entity, _ in pending:
            by_view.setdefault(view, []).append(entity)
        newest: dict[tuple[str, str], int | None] = {}
        for view, entities in by_view.items():
            rows = await store.read(self._project.views[view], sorted(set(entities)))
            newest.update({(view, r.entity): r.newest_event_ms for r in rows})
        now_ms = time.time() * 1000
        again = []
        for view, entity, ts in pending:
            seen = newest.get((view, entity))
            if seen is not None and seen >= ts:
                self.freshness_ms.append(now_ms - ts)
            elif now_ms - ts < self._timeout_ms:
                again.append((view, entity, ts))
            else:
                self.timed_out.append(f"{view}/{entity}@{ts}")
        with self._lock:
            self._pending[:0] = again

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self._timeout_ms / 1000 + 5)


@dataclass
class Demo:
    """What a project's driver gets: see the module docstring."""

    settings: CommonSettings
    project: Project
    client: Client
    serve_url: str
    config: DemoConfig
    outbox: Outbox
    probe: FreshnessProbe

    @property
    def duration_s(self) -> float:
        return self.config.duration_s

    @property
    def rate(self) -> float:
        return self.config.rate

    @property
    def events(self) -> int:
        return self.config.events

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def concurrency(self) -> int:
        return self.config.concurrency

    @property
    def out_dir(self) -> Path:
        return self.config.out_dir

    def option(self, name: str, default: T) -> T:
        """The driver setting ``name`` from ``DemoConfig.options`` (strings from the command line are
        converted to the type of ``default``)."""
        if name not in self.config.options:
            return default
        value = self.config.options[name]
        kind = type(default)
        try:
            if isinstance(default, bool) and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return cast(T, value.lower() in ("true", "1", "yes"))
            return cast(T, kind(value))  # type: ignore[call-arg]
        except (TypeError, ValueError):
            raise ConfigError(f"demo option {name!r}: {value!r} is not a {kind.__name__}") from None

    def scoring_url(self, model: str) -> str:
        if model not in self.project.models:
            raise ConfigError(f"no model {model!r} (models: {', '.join(self.project.models)})")
        return f"{self.serve_url}/v1/models/{model}/score"

    def produce(self, source: str, record: Mapping[str, Any]) -> None:
        """Queue ``record`` for ``source``'s topic (validated and keyed by ``client.produce``)."""
        self.outbox.put(source, record)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every queued record is acknowledged."""
        self.outbox.flush(timeout_s)

    def watch_freshness(self, view: str, entity: str, event_ts: int) -> None:
        self.probe.watch(view, entity, event_ts)

    def wait_visible(self, view: str, newest: Mapping[str, int], timeout_s: float = 60.0) -> None:
        """Wait until, for each entity, the store holds an event of ``view`` at least as recent as given."""
        spec = self.project.views[view]

        async def missing(store: RedisOnlineStore) -> int:
            rows = await store.read(spec, sorted(newest))
            return sum(1 for r in rows if r.newest_event_ms is None or r.newest_event_ms < newest[r.entity])

        async def wait() -> None:
            store = RedisOnlineStore.from_url(self.settings.redis_url, self.settings.topic_prefix)
            try:
                deadline = time.monotonic() + timeout_s
                while (left := await missing(store)) > 0:
                    if time.monotonic() > deadline:
                        raise StreamError(
                            f"view {view}: {left} of {len(newest)} entities not up to date "
                            f"in {timeout_s:.0f} s"
                        )
                    await asyncio.sleep(0.1)
            finally:
                await store.close()

        if newest:
            _run_coroutine(wait())


def _run_coroutine(coro: Any) -> None:
    """Run ``coro`` to the end, also from inside a running event loop (on a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def load_driver(folder: Path, name: str) -> Callable[[Demo], dict[str, Any]]:
    """The ``run`` function of ``folder``'s driver package, imported under a name of its own."""
    init = folder / "driver" / "__init__.py"
    if not init.is_file():
        raise ConfigError(
            f"{folder}: no driver (a package driver/ with run(demo) -> dict; see tide.demo's docstring)"
        )
    module_name = f"_tide_demo_driver_{name}"
    spec = importlib.util.spec_from_file_location(
        module_name, init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        raise ConfigError(f"{init}: cannot be imported")
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(module_name, None)
        raise
    run = getattr(module, "run", None)
    if not callable(run):
        raise ConfigError(f"{init}: has no function run(demo) -> dict")
    return cast(Callable[[Demo], dict[str, Any]], run)


def with_publish_every(project: Project, every: int | None) -> Project:
    """``project`` with every model publishing each ``every`` labels (for short runs)."""
    if every is None:
        return project
    d = project.to_dict()
    d["models"] = [{**m, "publish_every": every} for m in d["models"]]
    return dataclasses.replace(Project.from_dict(d), origins=project.origins)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _services(cfg: DemoConfig, stack: StackInfo, folder: Path, port: int) -> Iterator[Services]:
    env = {
        "TIDE_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "TIDE_REDIS_URL": stack.redis_url,
        "TIDE_STATE_DIR": str(cfg.out_dir / "stack"),
        "TIDE_PROJECT": str(folder),
        "TIDE_SERVE_PORT": str(port),
        "TIDE_LOG_LEVEL": "INFO",
    }
    if cfg.publish_every is not None:
        env["TIDE_TRAINER_PUBLISH_EVERY"] = str(cfg.publish_every)
    services = Services(env, cfg.out_dir / "logs")
    try:
        for name in SERVICES:
            services.start(name, name)
        serve_url = f"http://127.0.0.1:{port}"
        if not wait_until(lambda: _ready(serve_url) or bool(services.check_alive()), cfg.ready_timeout_s):
            raise StackError(
                f"scoring service not ready in {cfg.ready_timeout_s:.0f} s:\n" + services.log_tail("serve")
            )
        if dead := services.check_alive():
            raise StackError(f"{', '.join(dead)} exited:\n" + "\n".join(services.log_tail(d) for d in dead))
        yield services
    finally:
        services.stop_all()


def run_demo(cfg: DemoConfig, inspect: Callable[[DemoContext], None] | None = None) -> dict[str, Any]:
    """Run the project's loop, write ``report.json`` and ``loop.png`` into ``cfg.out_dir``, return the
    report."""
    from tide.client import Client
    from tide.plan import apply
    from tide.project import load_project

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would cost the driver
    folder = cfg.folder.resolve()
    project = with_publish_every(load_project(folder), cfg.publish_every)
    driver = load_driver(folder, project.name)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    serve_url = f"http://127.0.0.1:{port}"
    with EmbeddedStack(cfg.out_dir / "stack") as stack:
        settings = stack.settings(state_dir=cfg.out_dir / "stack", project=folder)
        ensure_topics(settings)  # the registry is read before apply creates anything
        applied = apply(settings, project)
        log.info("applied project %s (registry version %s)", project.name, applied["version"])
        with _services(cfg, stack, folder, port) as services:
            client = Client.connect(settings)
            demo = Demo(
                settings,
                client.project,
                client,
                serve_url,
                cfg,
                Outbox(client),
                FreshnessProbe(settings, project),
            )
            log.info("loop ready; driving %s: %d events at %.0f/s", project.name, cfg.events, cfg.rate)
            started = time.time()
            try:
                section = driver(demo)
                demo.outbox.close()
            finally:
                demo.probe.close()
            ended = time.time()
            time.sleep(3.0)  # let the processors finish the tail of the stream
            metrics_text = httpx.get(f"{serve_url}/metrics", timeout=5.0).text
            if inspect is not None:
                inspect(DemoContext(settings, stack, demo.project, serve_url, section))
            report = build_report(
                settings,
                demo.project,
                section,
                metrics_text,
                freshness_ms=demo.probe.freshness_ms,
                window=(started, ended),
            )
            report["services_exited"] = dead = services.check_alive()
            report["ok"] = report["ok"] and not dead
    write_plot(report, cfg.out_dir / "loop.png")
    (cfg.out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
