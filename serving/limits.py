"""Time limits on HTTP requests: slow clients are cut off, and no request runs unbounded.

:class:`RequestDeadline` is a pure ASGI middleware with one timer per request (``asyncio.timeout``):

- while the app waits for body chunks, the timer points at ``start + body_timeout_s``; when it fires
  there, the client answers ``408`` (``Connection: close``, since the rest of the body may still come);
- otherwise it points at ``start + request_timeout_s``; when it fires, ``504``;
- once the app has started its response the timer is lifted: a response that has begun is never cut.

The app is cancelled when the timer fires (``CancelledError`` is not an ``Exception``, so handlers that
map exceptions to 500 let it pass). Both answers carry the service's JSON error shape ``{"error": ...}``.
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


class RequestDeadline:
    """ASGI middleware: 408 when the body is not in after ``body_timeout_s``, 504 when the request is
    not answered within ``request_timeout_s`` (both counted from the request's arrival)."""

    def __init__(self, app: Any, body_timeout_s: float, request_timeout_s: float) -> None:
        if body_timeout_s <= 0 or request_timeout_s <= 0:
            raise ValueError("time limits must be positive")
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = asyncio.get_running_loop().time()
        request_deadline = arrived + self.request_timeout_s
        body_deadline = min(arrived + self.body_timeout_s, request_deadline)
        timer = asyncio.timeout_at(request_deadline)
        live = False  # the timer may be moved: entered, not yet fired
        body_done = started = cut_in_body = False

        async def guarded_receive() -> Any:
            nonlocal body_done, cut_in_body
            if body_done or not live:
                return await receive()  # e.g. waiting for a disconnect: not a body read
            if timer.expired():
                await _cancelled()
            timer.reschedule(body_deadline)
            try:
                message = await receive()
            finally:
                cut_in_body = timer.expired()
            if cut_in_body:
                await _cancelled()
            timer.reschedule(request_deadline)
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Mapping[str, Any]) -> None:
            nonlocal started, live
            if message["type"] == "http.response.start" and live:
                if timer.expired():
                    # Fired a moment ago: nothing of this response goes out; the timeout answer does.
                    await _cancelled()
                timer.reschedule(None)  # a response under way is never cut off
                live = False
                started = True
            elif message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            async with timer:
                live = True
                await self.app(scope, guarded_receive, guarded_send)
        except TimeoutError:
            if not timer.expired():
                raise  # the app's own, not ours
        finally:
            live = False
        if not timer.expired():
            return
        method, path = scope.get("method"), scope.get("path", "")
        if started:  # cannot happen by construction; if it did, nothing more can be said
            logger.warning("%s %s cut off after its response had started", method, path)
            return
        if cut_in_body:
            REQUEST_TIMEOUTS.labels("body").inc()
            logger.info("%s %s: body not received within %.1f s", method, path, self.body_timeout_s)
            await _answer(
                send, 408, f"request body not received within {self.body_timeout_s:g} s", close=True
            )
        else:
            REQUEST_TIMEOUTS.labels("request").inc()
            logger.warning("%s %s: not answered within %.1f s", method, path, self.request_timeout_s)
            await _answer(send, 504, f"request not answered within {self.request_timeout_s:g} s")


async def _cancelled() -> None:
    """Let the cancellation the expired timer has scheduled for this task land now."""
    await asyncio.sleep(0)
    raise asyncio.CancelledError  # only if it had already been delivered and swallowed


async def _answer(send: Any, status: int, message: str, *, close: bool = False) -> None:
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
