"""Per-request cost of the scoring service's middlewares (API-key auth, request deadline).

Each request is one ASGI call, in-process, on uvloop: a scoring POST with a JSON body and the headers a
client sends. Measured in the same run: a bare ASGI app (the floor), the same bare app behind each
middleware, and a one-route Starlette app (the framework's own per-request cost, for scale). Reports the
median of ``--reps`` runs of ``--requests`` calls, in microseconds per request, and writes JSON.

    .venv/bin/python -m bench.serving_middleware [--requests 20000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.auth import ApiKeyAuth, default_rules, new_key
from serving.limits import RequestDeadline

OUT = Path("out/bench/serving_middleware.json")
KEY, ENTRY = new_key("bench", ["score"])
OTHER_KEYS = [new_key(f"k{i}", ["score", "admin"])[1] for i in range(100)]  # lookup cost is O(1)
BODY = (
    b'{"entity": "card-000042", "features": '
    b'{"amount": 31.5, "category": "grocery", "country": "US", "card_present": true}}'
)
HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"python-httpx/0.28.1"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"authorization", b"Bearer " + KEY.encode()),
]
SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v1/models/fraud/score",
    "raw_path": b"/v1/models/fraud/score",
    "query_string": b"",
    "root_path": "",
    "headers": HEADERS,
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
RESPONSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json")],
}
RESPONSE_BODY = {"type": "http.response.body", "body": b'{"score": 0.1}'}


async def bare(scope: Any, receive: Any, send: Any) -> None:
    """Reads the body and answers: the least any ASGI app does per request."""
    await receive()
    await send(RESPONSE_START)
    await send(RESPONSE_BODY)


async def _endpoint(request: Request) -> Response:
    await request.body()
    return Response(b'{"score": 0.1}', media_type="application/json")


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": BODY, "more_body": False}


async def send(message: Any) -> None:
    return None


async def _time(app: Callable[..., Any], requests: int) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter() - started) / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    rules = default_rules("public")
    apps: dict[str, Callable[..., Any]] = {
        "bare": bare,
        "auth": ApiKeyAuth(bare, [*OTHER_KEYS, ENTRY], rules),
        "auth_off": ApiKeyAuth(bare, [], rules),
        "deadline": RequestDeadline(bare, 5.0, 2.0),
        "auth+deadline": RequestDeadline(ApiKeyAuth(bare, [*OTHER_KEYS, ENTRY], rules), 5.0, 2.0),
        "starlette_route": Starlette(routes=[Route("/v1/models/{name}/score", _endpoint, methods=["POST"])]),
    }

    async def run() -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {name: [] for name in apps}
        for app in apps.values():  # warm up
            await _time(app, 1000)
        for _ in range(args.reps):  # interleaved, so drift on a shared machine hits every variant alike
            for name, app in apps.items():
                samples[name].append(await _time(app, args.requests))
        return samples

    samples = uvloop.run(run())
    us = {name: statistics.median(values) for name, values in samples.items()}
    floor = us["bare"]
    result = {
        "command": "python -m bench.serving_middleware " + " ".join(sys.argv[1:] if argv is None else argv),
        "requests": args.requests,
        "reps": args.reps,
        "us_per_request": {k: round(v, 3) for k, v in us.items()},
        "overhead_us": {
            k: round(us[k] - floor, 3) for k in ("auth", "auth_off", "deadline", "auth+deadline")
        },
        "overhead_vs_starlette_route": {
            k: round((us[k] - floor) / us["starlette_route"], 3)
            for k in ("auth", "deadline", "auth+deadline")
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
