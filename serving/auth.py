"""API keys for the scoring service: how they are made, stored (hashed) and checked on each request.

A key is ``tide_`` followed by 32 random bytes (``secrets.token_urlsafe``); only its SHA-256 is ever
configured (``TIDE_SERVE_API_KEYS`` and/or the JSON file named by ``TIDE_SERVE_API_KEYS_FILE``), each
entry ``{"name": ..., "sha256": ..., "roles": ["score", "admin"]}``. Clients send
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

:class:`ApiKeyAuth` is a pure ASGI middleware: for each HTTP request it finds the access the path needs
(:class:`Rule`: public, a role, or hidden), hashes the presented key once and looks the digest up in a
dict. Why a fast hash and a dict lookup are right for random keys: ``docs/2026-11-21-serving-api.md``.
With no key configured, auth is off (one warning at start-up) and only hidden paths are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from infra.errors import ConfigError

if TYPE_CHECKING:
    from serving.settings import ServeSettings

logger = logging.getLogger(__name__)

Role = Literal["score", "admin"]
ROLES: tuple[Role, ...] = ("score", "admin")
KEY_PREFIX = "tide_"

# Access a path needs besides a role: anyone, or nobody (the route is switched off and answers 404).
PUBLIC = "public"
HIDDEN = "hidden"
# What an unmatched path needs: any valid key, so a route added without a rule is never open by mistake.
AUTHENTICATED = "authenticated"

AUTH_REJECTIONS = Counter(
    "tide_auth_rejections_total", "Requests refused by API-key auth", ["reason"]
)  # reason: missing, unknown, forbidden


class ApiKey(BaseModel):
    """One configured key: a name for logs, the SHA-256 of the key (hex) and the roles it grants."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    roles: tuple[Role, ...] = Field(min_length=1)

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


_KEY_LIST = TypeAdapter(list[ApiKey])


def digest(key: str) -> str:
    """The hex SHA-256 of ``key`` as configured and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str, roles: Iterable[str]) -> tuple[str, ApiKey]:
    """A fresh random key and its configuration entry. The key itself is shown once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        entry = ApiKey(name=name, sha256=digest(key), roles=tuple(roles))  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"invalid key entry: {exc.errors()[0]['msg']} (roles are {ROLES})") from None
    return key, entry


def configured_keys(settings: ServeSettings) -> list[ApiKey]:
    """The keys of ``TIDE_SERVE_API_KEYS`` plus those of ``TIDE_SERVE_API_KEYS_FILE`` (read now).

    Raises :class:`ConfigError` naming the setting when the file is unreadable or invalid, or when two
    entries share a name or a digest.
    """
    keys = list(settings.serve_api_keys)
    path = settings.serve_api_keys_file
    if path is not None:
        keys.extend(_read_keys_file(Path(path)))
    seen_names: set[str] = set()
    seen_digests: set[str] = set()
    for key in keys:
        if key.name in seen_names:
            raise ConfigError(f"TIDE_SERVE_API_KEYS(_FILE): two keys are named {key.name!r}")
        if key.sha256 in seen_digests:
            raise ConfigError(f"TIDE_SERVE_API_KEYS(_FILE): key {key.name!r} repeats another key's sha256")
        seen_names.add(key.name)
        seen_digests.add(key.sha256)
    return keys


def _read_keys_file(path: Path) -> list[ApiKey]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"TIDE_SERVE_API_KEYS_FILE: cannot read {path}: {exc}") from None
    try:
        return _KEY_LIST.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"TIDE_SERVE_API_KEYS_FILE: {path}: entry {where}: {err['msg']}") from None


# --- which access each path needs -------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """``path`` (exact, or with ``{param}`` segments as in Starlette routes) needs ``access``:
    :data:`PUBLIC`, :data:`HIDDEN` or a role name. ``methods`` limits the rule (None: every method)."""

    path: str
    access: str
    methods: frozenset[str] | None = None
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.access not in (PUBLIC, HIDDEN, AUTHENTICATED, *ROLES):
            raise ValueError(f"rule for {self.path}: unknown access {self.access!r}")
        if "{" in self.path:
            pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(self.path)) + "$"
            object.__setattr__(self, "_regex", re.compile(pattern))

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return path == self.path if self._regex is None else self._regex.match(path) is not None


def default_rules(metrics_auth: str = "public") -> list[Rule]:
    """The scoring service's rules. ``metrics_auth`` is ``TIDE_SERVE_METRICS_AUTH``."""
    metrics = {"public": PUBLIC, "admin": "admin", "off": HIDDEN}[metrics_auth]
    return [
        Rule("/v1/models/{name}/score", "score"),
        Rule("/v1/models/{name}/deployments", "admin"),
        Rule("/v1/models/{name}/deployments/{id}", "admin"),
        Rule("/v1/models/{name}/versions", "admin"),
        Rule("/v1/models", "admin"),
        Rule("/healthz", PUBLIC),
        Rule("/readyz", PUBLIC),
        Rule("/openapi.json", PUBLIC),
        Rule("/metrics", metrics),
    ]


class AccessRules:
    """Resolves the access a request needs: an exact-path rule first, then the others in order;
    :data:`AUTHENTICATED` when none matches. Answers are memoised per path (per method and path when a
    rule names methods), up to :attr:`MEMO_SIZE` of them, so the hot path costs one dict lookup."""

    MEMO_SIZE = 1024  # bounded: paths come from clients

    def __init__(self, rules: Sequence[Rule]) -> None:
        self._exact: dict[str, str] = {}
        self._patterns: list[Rule] = []
        for rule in rules:
            if rule._regex is None and rule.methods is None:
                self._exact.setdefault(rule.path, rule.access)
            else:
                self._patterns.append(rule)
        self._by_method = any(rule.methods is not None for rule in rules)
        self._memo: dict[Any, str] = {}

    def access_for(self, method: str, path: str) -> str:
        memo_key = (method, path) if self._by_method else path
        access = self._memo.get(memo_key)
        if access is None:
            access = self._resolve(method, path)
            if len(self._memo) < self.MEMO_SIZE:
                self._memo[memo_key] = access
        return access

    def _resolve(self, method: str, path: str) -> str:
        access = self._exact.get(path)
        if access is not None:
            return access
        for rule in self._patterns:
            if rule.matches(method, path):
                return rule.access
        return AUTHENTICATED


class _Denied(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


_WWW_AUTHENTICATE = b'Bearer realm="tide"'


class ApiKeyAuth:
    """ASGI middleware: refuse HTTP requests whose key does not grant the access their path needs.

    401 (with ``WWW-Authenticate: Bearer``) when the key is missing or unknown, 403 when it lacks the
    role, 404 for a hidden path; each with a JSON body ``{"error": ...}``. The key's name is put in
    ``scope["state"]["api_key"]`` (``request.state.api_key``) for logs. Lifespan and other scopes pass.
    ``rules`` default to :func:`default_rules` with metrics public.
    """

    def __init__(self, app: Any, keys: Sequence[ApiKey], rules: Sequence[Rule] | None = None) -> None:
        self.app = app
        self._by_digest: dict[bytes, ApiKey] = {bytes.fromhex(k.sha256): k for k in keys}
        self.rules = AccessRules(default_rules() if rules is None else rules)
        self.access_for = self.rules.access_for
        self.enabled = bool(self._by_digest)
        if not self.enabled:
            logger.warning(
                "no API keys configured (TIDE_SERVE_API_KEYS, TIDE_SERVE_API_KEYS_FILE): "
                "scoring and admin endpoints are open to anyone"
            )

    def check(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> ApiKey | None:
        """The key that grants access (None for a public path or with auth off); raises :class:`_Denied`."""
        access = self.access_for(method, path)
        if access == HIDDEN:
            raise _Denied(404, "hidden", "not found")
        if access == PUBLIC or not self.enabled:
            return None
        presented = _presented_key(headers)
        if presented is None:
            raise _Denied(
                401, "missing", "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        key = self._by_digest.get(hashlib.sha256(presented).digest())
        if key is None:
            raise _Denied(401, "unknown", "unknown API key")
        if access != AUTHENTICATED and access not in key.roles:
            raise _Denied(403, "forbidden", f"API key {key.name!r} lacks the {access!r} role")
        return key

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        try:
            key = self.check(scope.get("method", "GET"), scope["path"], scope["headers"])
        except _Denied as denied:
            AUTH_REJECTIONS.labels(denied.reason).inc()
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # policy violation
            else:
                await _refuse(send, denied)
            return
        if key is not None:
            scope = {**scope, "state": {**scope.get("state", {}), "api_key": key.name}}
        await self.app(scope, receive, send)


def _presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key from ``Authorization: Bearer`` (preferred) or ``X-API-Key``, as bytes; None if neither."""
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            api_key = value.strip()
    return api_key


async def _refuse(send: Any, denied: _Denied) -> None:
    body = orjson.dumps({"error": str(denied)})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if denied.status == 401:
        headers.append((b"www-authenticate", _WWW_AUTHENTICATE))
    await send({"type": "http.response.start", "status": denied.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
