"""The scoring service's HTTP app (Starlette).

Routes::

    POST /v1/models/{name}/score        score one instance or a batch ({"instances": [...]})
    GET  /v1/models                     every model: loaded versions, aliases and traffic split
    GET  /v1/models/{name}/versions     every version published: lineage, blessing, verdicts, status
    POST /v1/models/{name}/deployments  promote / canary / shadow / rollback / follow (202, or 409: why)
    GET  /v1/models/{name}/deployments[/{id}]  deployments and their outcomes (serving.admin)
    GET  /healthz                       the process is up
    GET  /readyz                        the models are loaded and Redis answers
    GET  /metrics                       Prometheus metrics (all workers' with several: serving.metrics)
    GET  /openapi.json                  the OpenAPI document of all of the above

One node serves every model of the project's definitions (read from the registry at start and followed
while it runs, or passed in): each with its own request schema (:class:`serving.validation.RequestSchema`),
documented in /openapi.json. A model applied while the node runs is served within seconds, a removed one
answers 404, a changed one is served per its versions' lineage (:mod:`serving.lineage`): the new
definitions are built aside (:class:`serving.catalog.Catalog`, each model's routing) and swapped in whole,
so no request fails because of a change. Every route but /healthz, /readyz and /openapi.json needs an
API key once keys are configured (serving.auth); request bodies and whole requests are bounded in time
(serving.limits).

:func:`create_app` takes its collaborators injected (tests) or builds them in the lifespan: a
:class:`serving.follower.ModelFollower` feeding the registry, the Redis online store and the prediction log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from features.store import RedisOnlineStore
from infra.errors import RequestError, Unavailable
from infra.imports import add_code_path
from infra.settings import load
from schemas.definitions import Project
from schemas.registry import Registered
from schemas.registry import load as load_definitions
from serving import scoring
from serving.admin import RETRY_AFTER_S, AdminRoutes, Deployer
from serving.auth import ApiKeyAuth, configured_keys, default_rules
from serving.catalog import Catalog, DefinitionsWatch
from serving.coalesce import CoalescingReader
from serving.follower import ModelFollower
from serving.limits import RequestDeadline
from serving.lineage import Lineage, pinned_inputs
from serving.metrics import metrics_payload
from serving.predlog import PredictionLog
from serving.registry import ModelRegistry
from serving.scoring import FeatureReader, PredictionSink
from serving.settings import ServeSettings, load_policy
from serving.validation import RequestSchema

logger = logging.getLogger(__name__)

REQUESTS = Counter("tide_requests_total", "HTTP requests served", ["route", "status"])
REQUEST_LATENCY = Histogram(
    "tide_request_latency_seconds",
    "Server-side HTTP request latency",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

FIRST_ANSWER_DELAY = Histogram(
    "tide_model_first_answer_delay_seconds",
    "Time from a model version's creation to its first answer on this worker (publish to first answer)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)

DEFINITIONS_VERSION = Gauge(
    "tide_serving_definitions_version",
    "Registry version of the definitions served (0: passed in, not read from the registry)",
    multiprocess_mode="mostrecent",
)
DEFINITIONS_CHANGES = Counter("tide_serving_definitions_changes_total", "Definitions taken up while running")

REQUEST_ID_HEADER = "x-request-id"


class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> ORJSONResponse:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return ORJSONResponse(body, status_code=status, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


def instrumented(route: str, handler: Handler) -> Handler:
    """Wrap a handler: map Tide errors to JSON responses and record request count and latency."""

    latency = REQUEST_LATENCY.labels(route)
    counts: dict[int, Any] = {}  # status -> its counter child, looked up once

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except RequestError as exc:
            response = error_response(exc.status, str(exc), exc.field)
        except Unavailable as exc:
            retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            response = error_response(exc.status, str(exc), headers=retry)
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            response = error_response(500, "internal error")
        counter = counts.get(response.status_code)
        if counter is None:
            counter = counts[response.status_code] = REQUESTS.labels(route, str(response.status_code))
        counter.inc()
        latency.observe(time.perf_counter() - started)
        return response

    return endpoint


def by_method(handlers: Mapping[str, Handler]) -> Handler:
    """One endpoint for a path that several methods share (one route: its 405 lists them all)."""

    async def endpoint(request: Request) -> Response:
        return await handlers[request.method](request)

    return endpoint


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than ``limit`` by its header or its actual size."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError("invalid Content-Length header", status=400) from None
        if size > limit:
            raise RequestError(f"body is larger than {limit} bytes", status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _answers_ping(store: Any, timeout_s: float) -> bool:
    # RedisOnlineStore has no ping of its own; its client does. Doubles may offer ping() directly.
    ping = getattr(store, "ping", None)
    if ping is None:
        client = getattr(store, "client", None)
        ping = getattr(client, "ping", None)
    if ping is None:
        return True
    return bool(await asyncio.wait_for(ping(), timeout_s))


class ScoringService:
    """The app's state and route handlers."""

    def __init__(
        self,
        settings: ServeSettings,
        project: Project,
        registry: ModelRegistry | None,
        store: FeatureReader | None,
        predlog: PredictionSink | None,
        deployer: Deployer | None = None,
        *,
        version: int | None = None,
        auth_enabled: bool = False,
    ) -> None:
        """``version``: the registry version of ``project``; the registry is followed from it while the
        service runs (None: ``project`` was passed in and is served as it is)."""
        self.settings = settings
        self.catalog = Catalog.build(settings, project, version=version, auth_enabled=auth_enabled)
        self._answered: set[tuple[str, int]] = set()
        self._id_prefix = os.urandom(8).hex()
        self._request_count = 0
        self.owns_registry = registry is None
        self.registry = registry or ModelRegistry(pending_s=settings.serve_deployment_pending_s)
        self.admin = AdminRoutes(settings, self.registry, lambda: self.catalog.schemas, read_body, deployer)
        # Reads the trusted keys now: a bad key file fails at start-up.
        self.lineage = Lineage(project, load_policy(settings))
        pin = functools.partial(pinned_inputs, project)
        for name, schema in self.catalog.schemas.items():  # every model is listed, loaded or not
            self.registry.define(name, schema, pin)
        self.store = store
        self.predlog = predlog
        self.follower: ModelFollower | None = None
        self.watch: DefinitionsWatch | None = None
        self._changing = threading.Lock()  # one change of definitions at a time
        DEFINITIONS_VERSION.set(version or 0)

    @property
    def project(self) -> Project:
        return self.catalog.project

    @property
    def schemas(self) -> Mapping[str, RequestSchema]:
        return self.catalog.schemas

    def apply_definitions(self, project: Project, version: int | None = None) -> None:
        """Serve ``project`` from now on, without a restart (see the module docstring).

        Everything derived from it is built aside first; then each model's routing is rebuilt and
        swapped (its versions pinned again to their lineage), the catalog swapped, removed models
        dropped, and the model follower told which models to follow and which to load again.
        """
        with self._changing:
            old = self.catalog
            catalog = Catalog.build(self.settings, project, version=version, auth_enabled=old.auth_enabled)
            pin = functools.partial(pinned_inputs, project)
            self.lineage.project = project  # loads from now on pin to it (swap pins again: no race)
            for name, schema in catalog.schemas.items():
                self.registry.define(name, schema, pin)
            self.catalog = catalog  # a request reads a model's routing first, then (none) the catalog
            removed = sorted(old.schemas.keys() - catalog.schemas.keys())
            for name in removed:
                self.registry.remove(name)
            if self.follower is not None:
                self.follower.follow(catalog.schemas)
                self.follower.reconsider(catalog.schemas)
        added = sorted(catalog.schemas.keys() - old.schemas.keys())
        DEFINITIONS_VERSION.set(version or 0)
        DEFINITIONS_CHANGES.inc()
        logger.info(
            "serving definitions v%s of project %s: models %s (added %s, removed %s)",
            version,
            project.name,
            ", ".join(catalog.schemas) or "none",
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )

    def _registered(self, registered: Registered) -> None:
        self.apply_definitions(registered.project, registered.version)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        owned_store: RedisOnlineStore | None = None
        owned_log: PredictionLog | None = None
        if self.store is None:
            # Namespaced by topic prefix, as the feature processor writes it.
            owned_store = RedisOnlineStore.from_url(self.settings.redis_url, self.settings.topic_prefix)
            self.store = CoalescingReader(owned_store)
        if self.predlog is None:
            self.predlog = owned_log = PredictionLog(self.settings)
            owned_log.start()
        if self.owns_registry:
            self.follower = ModelFollower(
                self.settings, self.registry, lineage=self.lineage, models=self.catalog.schemas
            )
            self.follower.start()
        version = self.catalog.version
        if version is not None:
            self.watch = DefinitionsWatch(self.settings, self._registered, since=version)
            self.watch.start()
        logger.info(
            "scoring service started (project %s, definitions v%s, models %s)",
            self.project.name,
            version,
            ", ".join(self.catalog.schemas),
        )
        try:
            yield
        finally:
            if self.watch is not None:
                await asyncio.to_thread(self.watch.stop)
                self.watch = None
            if self.follower is not None:
                await asyncio.to_thread(self.follower.stop)
                self.follower = None
            if owned_log is not None:
                await asyncio.to_thread(owned_log.close)
                self.predlog = None
            if owned_store is not None:
                await owned_store.close()
                self.store = None
            logger.info("scoring service stopped")

    def _schema(self, name: str) -> RequestSchema:
        schemas = self.catalog.schemas
        schema = schemas.get(name)
        if schema is None:
            raise RequestError(f"unknown model {name!r}; models: {', '.join(schemas)}", status=404)
        return schema

    async def score(self, request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["name"]
        # Read once: a swap from here on does not affect this request. The routing carries the schema
        # of the definitions its versions were pinned under; a model with none yet is looked up in the
        # catalog (swapped before a removed model's routing is dropped: never a 503 for a removed model).
        routing = self.registry.routing(name)
        schema = routing.schema if routing is not None and routing.schema is not None else self._schema(name)
        instances, batch = schema.parse_body(await read_body(request, self.settings.serve_max_body_bytes))
        if routing is None:
            raise Unavailable(f"model {name!r} has no version loaded yet", retry_after=RETRY_AFTER_S)
        if self.store is None or self.predlog is None:
            raise Unavailable("service is not started", retry_after=RETRY_AFTER_S)
        request_id = request.headers.get(REQUEST_ID_HEADER) or self._new_request_id()
        ids = [f"{request_id}-{i}" for i in range(len(instances))] if batch else [request_id]
        routed = scoring.route(routing, schema.inputs, instances)
        reads = [(r.inputs, inst) for r, inst in zip(routed, instances, strict=True)]
        shadow_inputs = None
        if routing.shadow is not None:  # its rows are read with the request's, in the same round trip
            shadow_inputs = routing.inputs_of(routing.shadow, schema.inputs)
            reads += [(shadow_inputs, inst) for inst in instances]
        found = await scoring.read_features(self.store, reads, self.settings.serve_request_timeout_s)
        scored = scoring.score(routed, instances, found, ids)
        scoring.log_predictions(self.predlog, scored, (time.perf_counter() - started) * 1000)
        self._first_answers(scored)
        items = [scoring.response_item(s) for s in scored]
        body = {"request_id": request_id, "predictions": items} if batch else items[0]
        mirror = None
        if routing.shadow is not None and shadow_inputs is not None:
            # after the response is sent: a shadow never delays or changes it
            mirror = BackgroundTask(
                scoring.shadow, routing.shadow, shadow_inputs, scored, found, self.predlog
            )
        return ORJSONResponse(body, headers={"X-Request-ID": request_id}, background=mirror)

    def _new_request_id(self) -> str:
        # Unique without uuid4's cost per request: a random per-process prefix and a counter.
        self._request_count += 1
        return f"{self._id_prefix}{self._request_count:016x}"

    def _first_answers(self, scored: list[scoring.Scored]) -> None:
        for s in scored:
            key = (s.model.name, s.model.version)
            if key not in self._answered:
                self._answered.add(key)
                FIRST_ANSWER_DELAY.observe(max(time.time() - s.model.published_ts / 1000, 0.0))

    async def healthz(self, request: Request) -> Response:
        return ORJSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready when the online store answers, a model serves, and every model a version of which was
        published has one loaded (a model nothing was published for yet does not hold the others up)."""
        reasons = []
        versions = {}
        models = self.catalog.schemas
        for name in models:
            model = self.registry.get(name)
            versions[name] = model.version if model is not None else None
            if model is None and self.registry.published(name):
                reasons.append(f"no version of model {name!r} loaded yet")
        if all(v is None for v in versions.values()) and not reasons:
            reasons.append(f"no version of any model loaded ({', '.join(models) or 'no models defined'})")
        reasons.extend(self.registry.problems())  # a champion pinned to a version that cannot serve
        if self.store is None:
            reasons.append("online store not started")
        else:
            try:
                if not await _answers_ping(self.store, self.settings.serve_request_timeout_s):
                    reasons.append("redis did not answer PING")
            except Exception as exc:
                reasons.append(f"redis did not answer PING: {type(exc).__name__}: {exc}")
        if reasons:
            return ORJSONResponse(
                {"status": "not ready", "reasons": reasons, "models": versions}, status_code=503
            )
        return ORJSONResponse({"status": "ready", "models": versions})

    async def metrics(self, request: Request) -> Response:
        body, content_type = metrics_payload()  # every worker's, summed, when there are several
        return Response(body, media_type=content_type)


def create_app(
    settings: ServeSettings | None = None,
    *,
    project: Project | None = None,
    registry: ModelRegistry | None = None,
    store: FeatureReader | None = None,
    predlog: PredictionSink | None = None,
    deployer: Deployer | None = None,
    definitions: Registered | None = None,
) -> Starlette:
    """The scoring app. Without ``settings`` they are read from ``TIDE_*`` (uvicorn factory mode); without
    ``project`` the definitions are ``definitions`` (as read from the registry) or read from the registry
    (``schemas.registry.load``), and the registry is followed while the app runs
    (:class:`serving.catalog.DefinitionsWatch`); a ``project`` passed in is served as it is.

    Collaborators passed in are used as they are and left running at shutdown; those not passed are
    built, started and stopped by the app's lifespan (an injected ``registry`` gets no follower).
    """
    settings = settings or load(ServeSettings)
    keys = configured_keys(settings)  # a bad key setting fails here, naming it
    # Pickled pipelines refer to functions of the project's code by module name.
    add_code_path(settings.project)
    version = None
    if project is None:
        registered = definitions or load_definitions(settings)
        project, version = registered.project, registered.version
    service = ScoringService(
        settings, project, registry, store, predlog, deployer, version=version, auth_enabled=bool(keys)
    )

    async def openapi(request: Request) -> Response:
        return Response(service.catalog.openapi, media_type="application/json")

    admin = service.admin
    routes = [
        Route("/v1/models/{name}/score", instrumented("score", service.score), methods=["POST"]),
        Route("/v1/models", instrumented("models", admin.list_models), methods=["GET"]),
        Route("/v1/models/{name}/versions", instrumented("versions", admin.versions), methods=["GET"]),
        Route(
            "/v1/models/{name}/deployments",
            by_method(
                {
                    "POST": instrumented("deploy", admin.deploy),
                    "GET": instrumented("deployments", admin.deployments),
                }
            ),
            methods=["GET", "POST"],
        ),
        Route(
            "/v1/models/{name}/deployments/{id}",
            instrumented("deployment", admin.deployment),
            methods=["GET"],
        ),
        Route("/healthz", instrumented("healthz", service.healthz), methods=["GET"]),
        Route("/readyz", instrumented("readyz", service.readyz), methods=["GET"]),
        Route("/metrics", instrumented("metrics", service.metrics), methods=["GET"]),
        Route("/openapi.json", instrumented("openapi", openapi), methods=["GET"]),
    ]
    middleware = [
        # Outermost first: the deadline covers everything; auth refuses before any body is read.
        Middleware(
            RequestDeadline,
            body_timeout_s=settings.serve_body_timeout_s,
            request_timeout_s=settings.serve_request_timeout_s,
        ),
        Middleware(ApiKeyAuth, keys=keys, rules=default_rules(settings.serve_metrics_auth)),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan, middleware=middleware)
    app.state.service = service
    app.state.registry = service.registry
    return app
