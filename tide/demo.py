"""``tide demo``: any project's whole loop on the embedded stack, driven by the project's own traffic.

:func:`run_demo` starts a private broker and Redis, applies the project (:func:`tide.plan.apply`: its
topics and the registry), starts the loop's services (:data:`tide.processes.SERVICES`: ``tide features``,
``train``, ``drift``, ``judge`` and ``serve``) as processes with ``TIDE_PROJECT`` set to the project
folder, and hands over to the project's driver. When the driver returns, it reads back what the loop
recorded (:mod:`tide.report`, :mod:`tide.loop_report`) and writes ``report.json`` and ``loop.png`` into
the output folder, with each service's log under ``logs/``.

``DemoConfig(reactions=False)`` applies the same project with every model's policy rewritten to only
report (:func:`without_reactions`): canaries are judged and drift is alerted on as before, but nothing
is promoted, rolled back or retrained. :func:`tide.compare.run_compare` runs both back to back and
compares how the online metric recovered after the injected drift.

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
- ``deploy(model, action, version, weight, reason)`` (``POST /v1/models/{model}/deployments``) and
  ``versions(model)`` (``GET /v1/models/{model}/versions``), for a driver that changes traffic mid-run;
- ``out_dir``, where a driver may write files of its own.

Keys of the returned section the runner reads (all optional):

- ``ok``: the driver's own verdict, and-ed into the report's;
- ``drift_injected_at``: the index (among scored request events) where the driver changed the world;
  the report then checks drift alerts come after it and none before;
- ``baselines``: ``{model: value}``, a naive predictor's value of the model's metric, drawn beside the
  online metric;
- ``canary``: ``{model, version, at_record, status, ...}`` when the driver deployed a canary; the report
  then requires a final verdict for it (and, when the policy acts on verdicts, the deployment it
  published applied);
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
import sys
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
from infra.topics import TOPICS, ensure_topics, prefixed, topic
from schemas.checkpoints import PositionWatch
from schemas.definitions import Project
from schemas.policy import Policy
from tide.driving import FreshnessProbe, Outbox, run_coroutine
from tide.embedded import EmbeddedStack, StackInfo, free_port
from tide.plot import write_plot
from tide.processes import SERVICES, Services, wait_until
from tide.report import build_report

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
    drain_s: float = 60.0  # at most this long for the processors to read the stream's tail (wait_until_read)
    reactions: bool = True  # False: every model's policy only reports (see without_reactions)

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
            run_coroutine(wait())

    def deploy(
        self, model: str, action: str, version: int | None = None, weight: float = 0.0, reason: str = ""
    ) -> dict[str, Any]:
        """``POST /v1/models/{model}/deployments``: ``{"status": HTTP status, **its JSON body}`` (202: the
        deployment and its outcome so far; 409: why it was refused)."""
        body: dict[str, Any] = {"action": action, "reason": reason or None}
        if version is not None:
            body["version"] = version
        if weight:
            body["weight"] = weight
        resp = httpx.post(f"{self.serve_url}/v1/models/{model}/deployments", json=body, timeout=10.0)
        return {"status": resp.status_code, **_json_object(resp)}

    def versions(self, model: str) -> list[dict[str, Any]]:
        """``GET /v1/models/{model}/versions``: every version serving has read, with lineage and blessing."""
        resp = httpx.get(f"{self.serve_url}/v1/models/{model}/versions", timeout=10.0)
        resp.raise_for_status()
        return list(_json_object(resp).get("versions") or [])


def _json_object(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {"text": resp.text[:500]}
    return body if isinstance(body, dict) else {"body": body}


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


def without_reactions(project: Project) -> Project:
    """``project`` with every model's policy only reporting: canary verdicts promote and roll back
    nothing, no alert triggers a retraining (judging, drift thresholds and blessing unchanged)."""
    d = project.to_dict()
    models = []
    for m in d["models"]:
        policy = Policy.from_dict(m.get("policy"))
        quiet = dataclasses.replace(
            policy,
            canary=dataclasses.replace(policy.canary, promote=False, rollback=False),
            retrain=dataclasses.replace(policy.retrain, on=()),
        )
        models.append({**m, "policy": quiet.to_dict()})
    d["models"] = models
    return dataclasses.replace(Project.from_dict(d), origins=project.origins)


def deployment_outcomes(serve_url: str, project: Project) -> dict[str, list[dict[str, Any]]]:
    """Per model, the deployments serving read and what became of each (``GET
    /v1/models/{name}/deployments``); a model serving cannot list is left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in project.models:
        try:
            resp = httpx.get(f"{serve_url}/v1/models/{name}/deployments", timeout=5.0)
        except httpx.HTTPError as exc:
            log.warning("deployments of %s not read: %s", name, exc)
            continue
        if resp.status_code == 200:
            out[name] = list(_json_object(resp).get("deployments") or [])
    return out


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


def wait_until_read(settings: CommonSettings, project: Project, timeout_s: float) -> dict[str, int]:
    """Wait until every processor that checkpoints (trainer, drift scorer, judge) has read the
    predictions and every source topic it reads to their end (its newest checkpoint, committed with
    its output, is at the high watermark), at most ``timeout_s``. Returns those still behind, with
    the records each had left. The report is read only then: what the tail of the stream caused (an
    alert, a verdict, a version) is in it, however far behind a processor was on a busy machine."""
    topics = {topic(settings, "predictions"): TOPICS["predictions"].partitions}
    topics.update({prefixed(settings, s.topic_name): s.partitions for s in project.sources.values()})
    watch = PositionWatch(settings)
    started = time.monotonic()
    try:
        while True:
            watch.poll()
            behind = {p: n for p, n in watch.behind(topics).items() if n}
            if not behind or time.monotonic() - started > timeout_s:
                break
            time.sleep(0.5)
    finally:
        watch.close()
    log.info(
        "processors %s after %.1f s",
        "behind: " + str(behind) if behind else "caught up",
        time.monotonic() - started,
    )
    return behind


def run_demo(cfg: DemoConfig, inspect: Callable[[DemoContext], None] | None = None) -> dict[str, Any]:
    """Run the project's loop, write ``report.json`` and ``loop.png`` into ``cfg.out_dir``, return the
    report."""
    from tide.client import Client
    from tide.plan import apply
    from tide.project import load_project

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would cost the driver
    folder = cfg.folder.resolve()
    project = with_publish_every(load_project(folder), cfg.publish_every)
    if not cfg.reactions:
        project = without_reactions(project)
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
            behind = wait_until_read(settings, demo.project, cfg.drain_s)
            metrics_text = httpx.get(f"{serve_url}/metrics", timeout=5.0).text
            outcomes = deployment_outcomes(serve_url, demo.project)
            if inspect is not None:
                inspect(DemoContext(settings, stack, demo.project, serve_url, section))
            report = build_report(
                settings,
                demo.project,
                section,
                metrics_text,
                freshness_ms=demo.probe.freshness_ms,
                window=(started, ended),
                outcomes=outcomes,
                reactions=cfg.reactions,
                rate=cfg.rate,
            )
            report["services_exited"] = dead = services.check_alive()
            report["processors_behind"] = behind
            if behind:
                report["problems"].append(
                    f"processors had not read the stream to its end {cfg.drain_s:.0f} s after the traffic: "
                    + ", ".join(f"{p} {n} records behind" for p, n in sorted(behind.items()))
                )
            report["ok"] = report["ok"] and not dead and not behind
    write_plot(report, cfg.out_dir / "loop.png")
    (cfg.out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
