"""RequestDeadline: slow bodies answer 408, slow requests 504, and a response under way is never cut."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from prometheus_client import REGISTRY

from serving.limits import RequestDeadline

Message = dict[str, Any]


def timeouts(kind: str) -> float:
    return REGISTRY.get_sample_value("tide_request_timeouts_total", {"kind": kind}) or 0.0


class Recorder:
    """An ASGI ``send`` that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.messages if m["type"] == "http.response.start")

    @property
    def headers(self) -> dict[bytes, bytes]:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return dict(start["headers"])

    def json(self) -> Any:
        return orjson.loads(
            b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
        )


def http_scope(method: str = "POST", path: str = "/v1/models/fraud/score") -> Message:
    return {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}


def receiver(*chunks: bytes, then_wait: float = 3600.0) -> Any:
    """An ASGI ``receive`` giving ``chunks`` (the last with more_body False unless ``then_wait``)."""
    queue = list(chunks)

    async def receive() -> Message:
        if queue:
            chunk = queue.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(queue) or then_wait > 0}
        await asyncio.sleep(then_wait)  # the client is slow, or (body done) never disconnects
        return {"type": "http.disconnect"}

    return receive


async def reading_app(scope: Message, receive: Any, send: Any) -> None:
    """Reads the whole body, then answers it back."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def sleeping_app(seconds: float, *, read_body: bool = False) -> Any:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        if read_body:
            await receive()
        await asyncio.sleep(seconds)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    return app


async def test_body_that_does_not_arrive_in_time_is_408_and_closes():
    before = timeouts("body")
    send = Recorder()
    started = time.perf_counter()
    await RequestDeadline(reading_app, 0.1, 5.0)(http_scope(), receiver(b'{"ent', then_wait=10), send)
    assert 0.09 < time.perf_counter() - started < 1.0
    assert send.status == 408
    assert send.headers[b"connection"] == b"close"
    assert send.headers[b"content-type"] == b"application/json"
    assert send.json() == {"error": "request body not received within 0.1 s"}
    assert timeouts("body") == before + 1


async def test_slow_handler_is_504_and_cancelled():
    before = timeouts("request")
    cancelled = asyncio.Event()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    send = Recorder()
    await RequestDeadline(app, 1.0, 0.1)(http_scope(), receiver(b"{}", then_wait=0), send)
    assert send.status == 504 and send.json() == {"error": "request not answered within 0.1 s"}
    assert b"connection" not in send.headers
    assert cancelled.is_set()
    assert timeouts("request") == before + 1


async def test_body_timeout_applies_only_while_waiting_for_the_body():
    # A GET that never reads a body, slower than the body limit but within the request limit: fine.
    send = Recorder()
    await RequestDeadline(sleeping_app(0.15), 0.05, 2.0)(http_scope("GET", "/readyz"), receiver(), send)
    assert send.status == 200
    # Same once the body has arrived quickly: the handler may take longer than the body limit.
    send = Recorder()
    app = sleeping_app(0.15, read_body=True)
    await RequestDeadline(app, 0.05, 2.0)(http_scope(), receiver(b"{}", then_wait=0), send)
    assert send.status == 200


async def test_fast_requests_pass_untouched_in_chunks():
    send = Recorder()
    await RequestDeadline(reading_app, 1.0, 1.0)(http_scope(), receiver(b"ab", b"cd", then_wait=0), send)
    assert send.status == 200 and send.messages[-1]["body"] == b"abcd"


async def test_a_started_response_is_never_cut():
    async def streaming(scope: Message, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await asyncio.sleep(0.06)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    send = Recorder()
    await RequestDeadline(streaming, 0.05, 0.1)(http_scope("GET", "/metrics"), receiver(), send)
    assert send.status == 200
    assert b"".join(m.get("body", b"") for m in send.messages[1:]) == b"abc"


async def test_the_apps_own_timeout_error_is_not_taken_for_ours():
    async def app(scope: Message, receive: Any, send: Any) -> None:
        raise TimeoutError("the app's")

    with pytest.raises(TimeoutError, match="the app's"):
        await RequestDeadline(app, 1.0, 1.0)(http_scope(), receiver(), Recorder())


async def test_request_limit_reached_while_waiting_for_the_body_is_still_the_clients_408():
    send = Recorder()
    await RequestDeadline(reading_app, 5.0, 0.1)(http_scope(), receiver(b"{", then_wait=10), send)
    assert send.status == 408 and send.json() == {"error": "request body not received within 0.1 s"}


async def test_an_app_that_swallows_the_cancellation_still_gets_the_timeout_answer():
    async def stubborn(scope: Message, receive: Any, send: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    send = Recorder()
    await RequestDeadline(stubborn, 1.0, 0.1)(http_scope("GET", "/readyz"), receiver(), send)
    assert send.status == 504 and [m["type"] for m in send.messages].count("http.response.start") == 1


async def test_only_the_slow_one_of_concurrent_requests_is_cut():
    fast, slow = sleeping_app(0.0), sleeping_app(5.0)

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await (slow if scope["path"] == "/readyz" else fast)(scope, receive, send)

    deadline = RequestDeadline(app, 1.0, 0.15)
    sends = [Recorder() for _ in range(6)]
    paths = ["/healthz"] * 5 + ["/readyz"]
    await asyncio.gather(
        *(deadline(http_scope("GET", p), receiver(), s) for p, s in zip(paths, sends, strict=True))
    )
    assert [s.status for s in sends] == [200] * 5 + [504]


async def test_someone_elses_cancellation_is_not_swallowed():
    task = asyncio.create_task(
        RequestDeadline(sleeping_app(5.0), 1.0, 1.0)(http_scope(), receiver(), Recorder())
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_other_scopes_pass_through():
    seen: list[str] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await RequestDeadline(app, 0.01, 0.01)({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]
    with pytest.raises(ValueError):
        RequestDeadline(app, 0, 1)


async def test_with_httpx_client_timeout_answer_is_json():
    app = RequestDeadline(sleeping_app(1.0), 1.0, 0.05)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide") as c:
        resp = await c.get("/v1/models")
    assert resp.status_code == 504 and resp.json()["error"].startswith("request not answered")


# --- over a real socket: a client that stops sending mid-body ------------------------------------------


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        RequestDeadline(reading_app, 0.2, 5.0), log_level="warning", lifespan="off", http="httptools"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def test_slow_client_over_a_socket_gets_408_and_the_connection_closed(server: tuple[str, int]):
    with socket.create_connection(server, timeout=5) as conn:
        conn.sendall(
            b"POST /v1/models/fraud/score HTTP/1.1\r\nHost: tide\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"entity": "card-1"'
        )
        started = time.monotonic()
        received = b""
        while chunk := conn.recv(65536):  # ends when the server closes the connection
            received += chunk
        elapsed = time.monotonic() - started
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), received
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {"error": "request body not received within 0.2 s"}
    assert 0.15 < elapsed < 3.0


def test_prompt_client_over_a_socket_is_served(server: tuple[str, int]):
    with httpx.Client(base_url=f"http://{server[0]}:{server[1]}") as c:
        resp = c.post("/v1/models/fraud/score", content=b'{"entity": "card-1"}')
    assert resp.status_code == 200 and resp.content == b'{"entity": "card-1"}'
