"""Time limits on HTTP requests: slow clients are cut off, and no request runs unbounded.

:class:`RequestDeadline` is a pure ASGI middleware. Each request has two deadlines, counted from its
arrival: ``body_timeout_s`` while the app waits for body chunks, ``request_timeout_s`` for the whole
request. When one passes before the app has started its response, the request's task is cancelled
(``CancelledError`` is not an ``Exception``, so handlers that map exceptions to 500 let it pass) and the
client gets ``408`` if the app was waiting for the body (with ``Connection: close``: the rest of it may
still come), else ``504``; both in the service's JSON error shape ``{"error": ...}``. A response that
has started is never cut.

Why one watcher task instead of a timer per request: ``asyncio.timeout`` moved at each body read and at
the response start costs ~25 µs a request on uvloop (one libuv timer each time), as much as Starlette's
own routing; a set of in-flight requests scanned every ``tick`` costs ~1 µs a request, and the limits
are seconds, so firing up to one tick late does not matter. The watcher runs only while requests are in
flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import orjson
from prometheus_client import Counter

logger = logging.getLogger(__name__)

REQUEST_TIMEOUTS = Counter(
    "tide_request_timeouts_total", "Requests cut off by a time limit", ["kind"]
)  # kind: body (408), request (504)

BODY, REQUEST = "body", "request"


class _InFlight:
    """One request's state, and the receive/send wrappers that keep it current."""

    __slots__ = (
        "_receive",
        "_send",
        "body_deadline",
        "body_done",
        "fired",
        "in_body",
        "request_deadline",
        "started",
        "task",
    )

    def __init__(
        self, task: asyncio.Task[Any], receive: Any, send: Any, body_deadline: float, request_deadline: float
    ) -> None:
        self.task = task
        self._receive = receive
        self._send = send
        self.body_deadline = body_deadline
        self.request_deadline = request_deadline
        self.in_body = False
        self.body_done = False
        self.started = False
        self.fired: str | None = None  # BODY or REQUEST once the watcher has cancelled the request

    def expired(self, now: float) -> str | None:
        """Which limit has passed, if the request can still be answered with it."""
        if self.started or self.fired is not None:
            return None
        if self.in_body and now >= self.body_deadline:
            return BODY
        if now >= self.request_deadline:
            return BODY if self.in_body else REQUEST
        return None

    async def receive(self) -> Any:
        if self.body_done or self.started:
            return await self._receive()  # e.g. waiting for a disconnect: not a body read
        self.in_body = True
        try:
            message = await self._receive()
        finally:
            self.in_body = False
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message: Mapping[str, Any]) -> None:
        if not self.started and message["type"] == "http.response.start":
            if self.fired is not None:  # the app swallowed our cancellation: its answer is not sent
                raise asyncio.CancelledError
            self.started = True
        await self._send(message)


class RequestDeadline:
    """ASGI middleware: 408 when the body is not in after ``body_timeout_s``, 504 when the request is
    not answered within ``request_timeout_s`` (both from the request's arrival; checked every ``tick_s``,
    by default a twentieth of a second or a quarter of the shorter limit)."""

    def __init__(
        self, app: Any, body_timeout_s: float, request_timeout_s: float, tick_s: float | None = None
    ) -> None:
        if body_timeout_s <= 0 or request_timeout_s <= 0:
            raise ValueError("time limits must be positive")
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.request_timeout_s = request_timeout_s
        self.tick_s = tick_s if tick_s is not None else min(0.05, body_timeout_s / 4, request_timeout_s / 4)
        self._inflight: set[_InFlight] = set()
        self._watcher: asyncio.Task[None] | None = None

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # ASGI servers run each request in a task
        now = loop.time()
        req = _InFlight(task, receive, send, now + self.body_timeout_s, now + self.request_timeout_s)
        self._inflight.add(req)
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch(), name="tide-request-deadline")
        try:
            await self.app(scope, req.receive, req.send)
        except asyncio.CancelledError:
            if req.fired is None or task.uncancel() > 0:
                raise  # not ours, or cancelled by someone else as well
        else:
            if req.fired is None:
                return
            task.uncancel()  # the app finished after swallowing our cancellation, without answering
        finally:
            self._inflight.discard(req)
        await self._answer(scope, req, send)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._inflight:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            for req in list(self._inflight):
                kind = req.expired(now)
                if kind is not None:
                    req.fired = kind
                    req.task.cancel()

    async def _answer(self, scope: Mapping[str, Any], req: _InFlight, send: Any) -> None:
        method, path = scope.get("method"), scope.get("path", "")
        if req.started:  # cannot happen (send refuses once fired); if it did, nothing more can be said
            logger.warning("%s %s cut off after its response had started", method, path)
            return
        REQUEST_TIMEOUTS.labels(req.fired).inc()
        if req.fired == BODY:
            limit = min(self.body_timeout_s, self.request_timeout_s)
            logger.info("%s %s: body not received within %.1f s", method, path, limit)
            message = f"request body not received within {limit:g} s"
            await _respond(send, 408, message, close=True)
        else:
            logger.warning("%s %s: not answered within %.1f s", method, path, self.request_timeout_s)
            await _respond(send, 504, f"request not answered within {self.request_timeout_s:g} s")


async def _respond(send: Any, status: int, message: str, *, close: bool = False) -> None:
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
