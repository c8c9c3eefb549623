"""The scoring service's admin routes: the registry's views and deployments (control plane only).

::

    GET  /v1/models                          every model: routing, policy, loaded, unblessed, pending
    GET  /v1/models/{name}/versions          every version published: lineage, blessing, verdicts, status
    POST /v1/models/{name}/deployments       publish a deployment (202 + Location), or 409 with why
    GET  /v1/models/{name}/deployments       recent deployments with their outcomes on this node
    GET  /v1/models/{name}/deployments/{id}  one deployment's outcome: pending, applied or refused (why)

A deployment is checked against what this node has read before it is published: a version never
published for the model, unblessed (for promote, canary and rollback), failed or refused, or a rollback
with nothing to roll back to answers 409, naming the model, the version and the reason. An accepted one
answers 202 with its id; every node applies it when it reads it back from the deployments topic, and its
outcome here is at its ``Location``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from infra.errors import RequestError, StreamError, Unavailable
from serving.deployments import deployment_record, publish_deployment
from serving.ledger import DeploymentRefused
from serving.registry import ModelRegistry
from serving.settings import ServeSettings
from serving.validation import RequestSchema, parse_json_object

DEPLOYMENT_FIELDS = frozenset({"action", "version", "weight", "reason"})
RETRY_AFTER_S = 1

# Publishes a validated deployment record (to the deployments topic, in production).
Deployer = Callable[[dict[str, Any]], Awaitable[None]]
ReadBody = Callable[[Request, int], Awaitable[bytes]]


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


class AdminRoutes:
    """Handlers of the admin routes; ``models`` gives the model schemas served now (the catalog's)."""

    def __init__(
        self,
        settings: ServeSettings,
        registry: ModelRegistry,
        models: Callable[[], Mapping[str, RequestSchema]],
        read_body: ReadBody,
        deployer: Deployer | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._models = models
        self._read_body = read_body
        self.deployer = deployer or self._publish

    def _model(self, request: Request) -> str:
        name: str = request.path_params["name"]
        models = self._models()
        if name not in models:
            raise RequestError(f"unknown model {name!r}; models: {', '.join(models)}", status=404)
        return name

    async def list_models(self, request: Request) -> Response:
        self.registry.expire()
        return _json({"models": self.registry.describe()})

    async def versions(self, request: Request) -> Response:
        name = self._model(request)
        return _json({"model": name, "versions": self.registry.versions(name) or []})

    async def deployments(self, request: Request) -> Response:
        name = self._model(request)
        self.registry.expire()
        return _json({"model": name, "deployments": self.registry.deployments(name) or []})

    async def deployment(self, request: Request) -> Response:
        name = self._model(request)
        self.registry.expire()
        found = self.registry.deployment(name, request.path_params["id"])
        if found is None:
            raise RequestError(
                f"no deployment {request.path_params['id']!r} of model {name!r} here", status=404
            )
        return _json(found)

    async def deploy(self, request: Request) -> Response:
        """Publish a traffic change for a model; every node applies it when it reads it back (202)."""
        name = self._model(request)
        body = parse_json_object(await self._read_body(request, self.settings.serve_max_body_bytes))
        extra = sorted(body.keys() - DEPLOYMENT_FIELDS)
        if extra:
            raise RequestError(
                f"unknown field; allowed: {', '.join(sorted(DEPLOYMENT_FIELDS))}", field=extra[0]
            )
        if "action" not in body:
            raise RequestError("is required", field="action")
        record = deployment_record(
            name, body["action"], body.get("version"), body.get("weight", 0.0), body.get("reason"), "api"
        )
        try:
            self.registry.preview(record)  # refuse here what this node would not apply
        except DeploymentRefused as exc:
            return _json(exc.body(), 409)
        self.registry.expect(record)
        try:
            await self.deployer(record)
        except Exception as exc:
            self.registry.abandon(record, str(exc))
            raise
        outcome = self.registry.deployment(name, record["id"])
        location = f"/v1/models/{name}/deployments/{record['id']}"
        return _json({"deployment": record, "outcome": outcome}, 202, {"Location": location})

    async def _publish(self, record: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(publish_deployment, self.settings, record)
        except StreamError as exc:
            raise Unavailable(str(exc), retry_after=RETRY_AFTER_S) from exc
