"""API keys: generation, hashed configuration (env and file), and the ApiKeyAuth middleware's answers."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from infra.errors import ConfigError
from infra.settings import load
from serving.auth import (
    AUTHENTICATED,
    HIDDEN,
    PUBLIC,
    AccessRules,
    ApiKey,
    ApiKeyAuth,
    Rule,
    configured_keys,
    default_rules,
    digest,
    new_key,
)
from serving.settings import ServeSettings
from tide.cli import main

SCORE_KEY, SCORE_ENTRY = new_key("scorer", ["score"])
ADMIN_KEY, ADMIN_ENTRY = new_key("operator", ["admin"])
BOTH_KEY, BOTH_ENTRY = new_key("both", ["score", "admin"])
KEYS = [SCORE_ENTRY, ADMIN_ENTRY, BOTH_ENTRY]


def rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("tide_auth_rejections_total", {"reason": reason}) or 0.0


# --- keys and their configuration ---------------------------------------------------------------------


def test_new_key_is_random_prefixed_and_only_its_digest_is_kept():
    key, entry = new_key("ci", ["score", "admin"])
    other, _ = new_key("ci", ["score"])
    assert key.startswith("tide_") and len(key) == len("tide_") + 43 and key != other
    assert entry.sha256 == hashlib.sha256(key.encode()).hexdigest() == digest(key)
    assert key not in entry.model_dump_json()
    assert entry.roles == ("score", "admin") and entry.name == "ci"


@pytest.mark.parametrize(
    ("roles", "name"), [(["superuser"], "x"), ([], "x"), (["score"], "")], ids=["role", "none", "name"]
)
def test_new_key_rejects_bad_entries(roles: list[str], name: str):
    with pytest.raises(ConfigError):
        new_key(name, roles)


def test_api_key_digest_is_hex_of_64_and_lowercased():
    upper = ApiKey(name="a", sha256="AB" * 32, roles=("score",))
    assert upper.sha256 == "ab" * 32
    with pytest.raises(ValueError):
        ApiKey(name="a", sha256="ab" * 31, roles=("score",))
    with pytest.raises(ValueError):
        ApiKey(name="a", sha256="zz" * 32, roles=("score",))


def test_keys_from_env_json_and_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("TIDE_SERVE_API_KEYS", json.dumps([SCORE_ENTRY.model_dump(mode="json")]))
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([ADMIN_ENTRY.model_dump(mode="json")]))
    monkeypatch.setenv("TIDE_SERVE_API_KEYS_FILE", str(path))
    settings = load(ServeSettings)
    assert settings.serve_api_keys == [SCORE_ENTRY]
    assert configured_keys(settings) == [SCORE_ENTRY, ADMIN_ENTRY]


def test_bad_key_settings_fail_naming_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("TIDE_SERVE_API_KEYS", '[{"name": "a", "sha256": "00", "roles": ["score"]}]')
    with pytest.raises(ConfigError, match="TIDE_SERVE_API_KEYS_0_SHA256"):
        load(ServeSettings)
    monkeypatch.setenv(
        "TIDE_SERVE_API_KEYS", '[{"name": "a", "sha256": "' + "0" * 64 + '", "roles": ["root"]}]'
    )
    with pytest.raises(ConfigError, match="TIDE_SERVE_API_KEYS_0_ROLES"):
        load(ServeSettings)
    monkeypatch.delenv("TIDE_SERVE_API_KEYS")

    path = tmp_path / "keys.json"
    missing = ServeSettings(serve_api_keys_file=tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="TIDE_SERVE_API_KEYS_FILE: cannot read"):
        configured_keys(missing)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="TIDE_SERVE_API_KEYS_FILE: cannot read"):
        configured_keys(ServeSettings(serve_api_keys_file=path))
    path.write_text(json.dumps([{"name": "a", "sha256": "0" * 64, "roles": ["score"], "key": "oops"}]))
    with pytest.raises(ConfigError, match=r"TIDE_SERVE_API_KEYS_FILE: .*entry 0\.key"):
        configured_keys(ServeSettings(serve_api_keys_file=path))


def test_duplicate_names_or_digests_are_refused():
    twin = ApiKey(name="scorer", sha256="1" * 64, roles=("admin",))
    with pytest.raises(ConfigError, match="two keys are named 'scorer'"):
        configured_keys(ServeSettings(serve_api_keys=[SCORE_ENTRY, twin]))
    same = ApiKey(name="copy", sha256=SCORE_ENTRY.sha256, roles=("admin",))
    with pytest.raises(ConfigError, match="repeats another key's sha256"):
        configured_keys(ServeSettings(serve_api_keys=[SCORE_ENTRY, same]))


def test_cli_keys_new_prints_the_key_once_and_its_entry(capsys: pytest.CaptureFixture[str]):
    assert main(["keys", "new", "--name", "ci", "--roles", "score,admin"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["key"].startswith("tide_")
    assert out["entry"] == {"name": "ci", "sha256": digest(out["key"]), "roles": ["score", "admin"]}
    # The entry is exactly what TIDE_SERVE_API_KEYS takes.
    assert ServeSettings(serve_api_keys=[out["entry"]]).serve_api_keys[0].sha256 == digest(out["key"])
    assert main(["keys", "new", "--name", "ci", "--roles", "root"]) == 2


# --- which access each path needs ---------------------------------------------------------------------


def test_default_rules():
    rules = AccessRules(default_rules("public"))
    assert rules.access_for("POST", "/v1/models/fraud/score") == "score"
    assert rules.access_for("POST", "/v1/models/fraud/deployments") == "admin"
    assert rules.access_for("GET", "/v1/models") == "admin"
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert rules.access_for("GET", path) == PUBLIC
    # A parameter is one path segment; anything else falls to the default: a valid key.
    assert rules.access_for("POST", "/v1/models/a/b/score") == AUTHENTICATED
    assert rules.access_for("GET", "/v1/models/") == AUTHENTICATED
    assert rules.access_for("GET", "/admin") == AUTHENTICATED
    assert AccessRules(default_rules("admin")).access_for("GET", "/metrics") == "admin"
    assert AccessRules(default_rules("off")).access_for("GET", "/metrics") == HIDDEN


def test_rules_with_methods_and_exact_before_pattern():
    rules = AccessRules(
        [
            Rule("/v1/models/{name}", "admin", methods=frozenset({"DELETE"})),
            Rule("/v1/models/{name}", "score"),
            Rule("/v1/models/special", PUBLIC),
        ]
    )
    assert rules.access_for("DELETE", "/v1/models/fraud") == "admin"
    assert rules.access_for("GET", "/v1/models/fraud") == "score"
    assert rules.access_for("DELETE", "/v1/models/special") == PUBLIC
    with pytest.raises(ValueError, match="unknown access"):
        Rule("/x", "superuser")


# --- the middleware -------------------------------------------------------------------------------------


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path, "api_key": request.scope.get("state", {}).get("api_key")})


ROUTES = [
    Route("/v1/models/{name}/score", _echo, methods=["POST"]),
    Route("/v1/models/{name}/deployments", _echo, methods=["POST"]),
    Route("/v1/models", _echo, methods=["GET"]),
    Route("/healthz", _echo, methods=["GET"]),
    Route("/readyz", _echo, methods=["GET"]),
    Route("/openapi.json", _echo, methods=["GET"]),
    Route("/metrics", _echo, methods=["GET"]),
]


def client_for(keys: list[ApiKey], metrics_auth: str = "public") -> httpx.AsyncClient:
    app = ApiKeyAuth(Starlette(routes=ROUTES), keys, default_rules(metrics_auth))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tide")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_missing_and_unknown_keys_answer_401_naming_the_problem():
    missing, unknown = rejections("missing"), rejections("unknown")
    async with client_for(KEYS) as c:
        resp = await c.post("/v1/models/fraud/score", json={})
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["error"].startswith("missing API key")
        for headers in (bearer("tide_not-a-key"), {"X-API-Key": "tide_not-a-key"}):
            resp = await c.post("/v1/models/fraud/score", json={}, headers=headers)
            assert resp.status_code == 401 and resp.json() == {"error": "unknown API key"}
            assert resp.headers["www-authenticate"].startswith("Bearer")
        # Another scheme, or an empty bearer token, is no key at all.
        for headers in ({"Authorization": f"Basic {SCORE_KEY}"}, {"Authorization": "Bearer "}):
            resp = await c.post("/v1/models/fraud/score", json={}, headers=headers)
            assert resp.status_code == 401 and resp.json()["error"].startswith("missing API key")
    assert rejections("missing") == missing + 3 and rejections("unknown") == unknown + 2


async def test_a_key_without_the_role_is_403():
    async with client_for(KEYS) as c:
        resp = await c.post("/v1/models/fraud/deployments", json={}, headers=bearer(SCORE_KEY))
        assert resp.status_code == 403
        assert resp.json() == {"error": "API key 'scorer' lacks the 'admin' role"}
        assert "www-authenticate" not in resp.headers
        resp = await c.get("/v1/models", headers={"X-API-Key": SCORE_KEY})
        assert resp.status_code == 403
        resp = await c.post("/v1/models/fraud/score", json={}, headers=bearer(ADMIN_KEY))
        assert resp.status_code == 403 and "'score' role" in resp.json()["error"]


async def test_valid_keys_pass_by_either_header_and_name_themselves_to_the_app():
    async with client_for(KEYS) as c:
        resp = await c.post("/v1/models/fraud/score", json={}, headers=bearer(SCORE_KEY))
        assert resp.status_code == 200 and resp.json()["api_key"] == "scorer"
        resp = await c.post(
            "/v1/models/fraud/score", json={}, headers={"authorization": f"bearer {BOTH_KEY}"}
        )
        assert resp.status_code == 200 and resp.json()["api_key"] == "both"
        resp = await c.post("/v1/models/fraud/deployments", json={}, headers={"X-API-Key": ADMIN_KEY})
        assert resp.status_code == 200 and resp.json()["api_key"] == "operator"
        resp = await c.get("/v1/models", headers=bearer(BOTH_KEY))
        assert resp.status_code == 200
        # Authorization is preferred when both are sent.
        resp = await c.get("/v1/models", headers={**bearer(ADMIN_KEY), "X-API-Key": SCORE_KEY})
        assert resp.status_code == 200 and resp.json()["api_key"] == "operator"


async def test_public_paths_need_no_key_and_unknown_paths_need_one():
    async with client_for(KEYS) as c:
        for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
            resp = await c.get(path)
            assert resp.status_code == 200, path
            assert resp.json()["api_key"] is None
        assert (await c.get("/admin")).status_code == 401
        assert (await c.get("/admin", headers=bearer(SCORE_KEY))).status_code == 404  # by the router


@pytest.mark.parametrize(
    ("mode", "anonymous", "scorer", "admin"),
    [("public", 200, 200, 200), ("admin", 401, 403, 200), ("off", 404, 404, 404)],
)
async def test_metrics_exposure(mode: str, anonymous: int, scorer: int, admin: int):
    async with client_for(KEYS, metrics_auth=mode) as c:
        assert (await c.get("/metrics")).status_code == anonymous
        assert (await c.get("/metrics", headers=bearer(SCORE_KEY))).status_code == scorer
        resp = await c.get("/metrics", headers=bearer(ADMIN_KEY))
        assert resp.status_code == admin
        if mode == "off":
            assert resp.json() == {"error": "not found"}


async def test_no_keys_turns_auth_off_with_one_warning(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        client = client_for([], metrics_auth="off")
    assert [r.message for r in caplog.records if "no API keys configured" in r.message] != []
    async with client as c:
        caplog.clear()
        assert (await c.post("/v1/models/fraud/score", json={})).status_code == 200
        assert (await c.get("/v1/models")).status_code == 200
        assert (await c.get("/metrics")).status_code == 404  # off is off, keys or not
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_lifespan_and_other_scopes_pass_through():
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    auth = ApiKeyAuth(app, KEYS)
    await auth({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await auth({"type": "websocket", "path": "/v1/models", "headers": []}, None, send)
    assert seen == ["lifespan"] and sent == [{"type": "websocket.close", "code": 1008}]
