"""The scoring service's HTTP app (Starlette).

Routes::

    POST /v1/models/{name}/score        score one instance or a batch ({"instances": [...]})
    GET  /v1/models                     every model: loaded versions, aliases and traffic split
    POST /v1/models/{name}/deployments  promote / canary / shadow / rollback / follow (202)
    GET  /healthz                       the process is up
    GET  /readyz                        the models are loaded and Redis answers
    GET  /metrics                       Prometheus metrics (all workers' with several: serving.metrics)
    GET  /openapi.json                  the OpenAPI document of all of the above

One node serves every model of the project's definitions (read from the registry at start, or passed
in): each with its own request schema (:class:`serving.validation.RequestSchema`), documented in
/openapi.json. Every route but /healthz, /readyz and /openapi.json needs an API key once keys are
configured (serving.auth); request bodies and whole requests are bounded in time (serving.limits).

:func:`create_app` takes its collaborators injected (tests) or builds them in the lifespan: a
:class:`ModelFollower` feeding the registry, the Redis online store and the prediction log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from features.store import RedisOnlineStore
from infra.errors import RequestError, StreamError, Unavailable
from infra.imports import add_code_path
from infra.settings import load
from models.inputs import ModelInputs, model_inputs
from models.runtime import make_loader
from schemas.definitions import Project
from schemas.registry import load as load_definitions
from serving import scoring
from serving.auth import ApiKeyAuth, configured_keys, default_rules
from serving.coalesce import CoalescingReader
from serving.deployments import deployment_record, publish_deployment
from serving.limits import RequestDeadline
from serving.metrics import metrics_payload
from serving.openapi import openapi_document
from serving.predlog import PredictionLog
from serving.registry import ModelFollower, ModelRegistry
from serving.scoring import FeatureReader, PredictionSink
from serving.settings import ServeSettings, load_policy
from serving.validation import RequestSchema, parse_json_object

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

REQUEST_ID_HEADER = "x-request-id"
DEPLOYMENT_FIELDS = frozenset({"action", "version", "weight", "reason"})
RETRY_AFTER_S = 1  # what a 503 tells clients to wait


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
# Publishes a validated deployment record (to the deployments topic, in production).
Deployer = Callable[[dict[str, Any]], Awaitable[None]]


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
    ) -> None:
        self.settings = settings
        self.project = project
        self.inputs: dict[str, ModelInputs] = model_inputs(project)
        self.schemas = {name: RequestSchema(inputs) for name, inputs in self.inputs.items()}
        self.deployer = deployer or self._publish_deployment
        self._answered: set[tuple[str, int]] = set()
        self._id_prefix = os.urandom(8).hex()
        self._request_count = 0
        self.owns_registry = registry is None
        self.registry = registry or ModelRegistry(known=self.inputs)
        for name in self.inputs:  # every model is listed, loaded or not
            self.registry.declare(name)
        self.store = store
        self.predlog = predlog
        self.follower: ModelFollower | None = None
        # Reads the trusted keys now: a bad key file fails at start-up.
        self.loader = make_loader(self.inputs, load_policy(settings))

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
                self.settings, self.registry, loader=self.loader, models=self.inputs
            )
            self.follower.start()
        logger.info(
            "scoring service started (project %s, models %s)", self.project.name, ", ".join(self.inputs)
        )
        try:
            yield
        finally:
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
        schema = self.schemas.get(name)
        if schema is None:
            raise RequestError(f"unknown model {name!r}; models: {', '.join(self.schemas)}", status=404)
        return schema

    async def score(self, request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["name"]
        schema = self._schema(name)
        instances, batch = schema.parse_body(await read_body(request, self.settings.serve_max_body_bytes))
        routing = self.registry.routing(name)  # read once: a swap from here on does not affect this request
        if routing is None:
            raise Unavailable(f"model {name!r} has no version loaded yet", retry_after=RETRY_AFTER_S)
        if self.store is None or self.predlog is None:
            raise Unavailable("service is not started", retry_after=RETRY_AFTER_S)
        request_id = request.headers.get(REQUEST_ID_HEADER) or self._new_request_id()
        ids = [f"{request_id}-{i}" for i in range(len(instances))] if batch else [request_id]
        inputs = schema.inputs
        rows = await scoring.read_features(
            self.store, inputs, instances, self.settings.serve_request_timeout_s
        )
        scored = scoring.score(routing, inputs, instances, rows, ids)
        scoring.log_predictions(self.predlog, scored, (time.perf_counter() - started) * 1000)
        self._first_answers(scored)
        items = [scoring.response_item(s) for s in scored]
        body = {"request_id": request_id, "predictions": items} if batch else items[0]
        mirror = None
        if routing.shadow is not None:  # after the response is sent: a shadow never delays or changes it
            mirror = BackgroundTask(scoring.shadow, routing.shadow, scored, self.predlog)
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

    async def list_models(self, request: Request) -> Response:
        return ORJSONResponse({"models": self.registry.describe()})

    async def deploy(self, request: Request) -> Response:
        """Publish a traffic change for a model; every node applies it when it reads it back (202)."""
        name = request.path_params["name"]
        self._schema(name)
        body = parse_json_object(await read_body(request, self.settings.serve_max_body_bytes))
        extra = sorted(body.keys() - DEPLOYMENT_FIELDS)
        if extra:
            raise RequestError(
                f"unknown field; allowed: {', '.join(sorted(DEPLOYMENT_FIELDS))}", field=extra[0]
            )
        if "action" not in body:
            raise RequestError("is required", field="action")
        record = deployment_record(
            name, body["action"], body.get("version"), body.get("weight", 0.0), body.get("reason")
        )
        self.registry.preview(record)  # refuse here (409) what this node could not apply
        await self.deployer(record)
        return ORJSONResponse({"deployment": record}, status_code=202)

    async def _publish_deployment(self, record: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(publish_deployment, self.settings, record)
        except StreamError as exc:
            raise Unavailable(str(exc), retry_after=RETRY_AFTER_S) from exc

    async def healthz(self, request: Request) -> Response:
        return ORJSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready when the online store answers, a model serves, and every model a version of which was
        published has one loaded (a model nothing was published for yet does not hold the others up)."""
        reasons = []
        versions = {}
        for name in self.inputs:
            model = self.registry.get(name)
            versions[name] = model.version if model is not None else None
            if model is None and self.registry.published(name):
                reasons.append(f"no version of model {name!r} loaded yet")
        if all(v is None for v in versions.values()) and not reasons:
            reasons.append(
                f"no version of any model loaded ({', '.join(self.inputs) or 'no models defined'})"
            )
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
) -> Starlette:
    """The scoring app. Without ``settings`` they are read from ``TIDE_*`` (uvicorn factory mode); without
    ``project`` the definitions are read from the registry (``schemas.registry.load``).

    Collaborators passed in are used as they are and left running at shutdown; those not passed are
    built, started and stopped by the app's lifespan (an injected ``registry`` gets no follower).
    """
    settings = settings or load(ServeSettings)
    keys = configured_keys(settings)  # a bad key setting fails here, naming it
    # Pickled pipelines refer to functions of the project's code by module name.
    add_code_path(settings.project)
    if project is None:
        project = load_definitions(settings).project
    service = ScoringService(settings, project, registry, store, predlog, deployer)
    document = openapi_document(settings, auth_enabled=bool(keys), models=service.schemas)
    openapi_body = orjson.dumps(document)

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type="application/json")

    routes = [
        Route("/v1/models/{name}/score", instrumented("score", service.score), methods=["POST"]),
        Route("/v1/models", instrumented("models", service.list_models), methods=["GET"]),
        Route("/v1/models/{name}/deployments", instrumented("deploy", service.deploy), methods=["POST"]),
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
