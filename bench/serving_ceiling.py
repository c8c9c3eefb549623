"""The ceiling of ``make bench-serving``: a bare Starlette scoring endpoint, nothing behind it.

Same stack as ``tide serve`` (uvicorn with uvloop and httptools, one worker, orjson), same route, same
request body, and an answer of the same shape and size as a real Tide answer (``--template``, captured
from ``tide serve`` in the same run): the body is parsed, the request's fields are put in the template's
feature map, a request id is drawn. No validation, feature read, model or prediction log: what is left
is the cost of HTTP + JSON in one Python process, the most a Python scoring endpoint can do per worker.

    python -m bench.serving_ceiling --port 8001 --template out/bench/serving-run/template.json
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def create_app(template: dict[str, Any]) -> Starlette:
    async def score(request: Request) -> Response:
        data = orjson.loads(await request.body())
        out = dict(template)
        out["request_id"] = uuid.uuid4().hex
        out["features"] = {**template.get("features", {}), **data.get("features", {})}
        return Response(orjson.dumps(out), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/models/{name}/score", score, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving_ceiling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--template", type=Path, required=True, help="a Tide scoring answer (JSON)")
    args = parser.parse_args(argv)
    app = create_app(orjson.loads(args.template.read_bytes()))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
