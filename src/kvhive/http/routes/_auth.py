"""HTTP authentication: API keys (lmcache 0.5.7's, every path) and kvhive's admin token.

Two independent credentials, both constant-time compared:

* **API keys** (``--api-key-file``/``--http-api-key-file``, repeatable; ``$LMCACHE_API_KEY_FILE``
  and ``$LMCACHE_API_KEY``, or the legacy ``$LMCACHE_HTTP_API_KEY_FILE`` /
  ``$LMCACHE_HTTP_API_KEY`` when the new one is unset or empty).  With at least one key, every
  request except ``GET /`` and ``/healthcheck`` — reads, ``/metrics``, ``/docs``, unknown paths
  included — must carry ``Authorization: Bearer KEY`` or ``X-LMCache-API-Key: KEY``, else
  401 ``{"detail": "Invalid or missing API key"}`` with ``WWW-Authenticate: Bearer``, as in
  0.5.7 (:class:`ApiKeyAuth`, an ASGI middleware).  The admin token counts as a key too.
* **The admin token** (``--http-api-token``, kvhive's own): when set, every POST/PUT/PATCH/
  DELETE request and a ``GET /loglevel`` that sets a level must carry it
  (``Authorization: Bearer TOKEN`` or ``X-API-Token: TOKEN``), else 401; an API key does not
  authorise a change (:func:`require_token`, a router dependency).

Key files are read once, at start-up (:func:`load_api_keys`): each holds one key on one line
(surrounding whitespace stripped); an unreadable, empty or multi-line file is a
:class:`ConfigError` naming its flag or variable, so ``kvhive server`` exits 2.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kvhive import envs
from kvhive.config import HTTPAdminConfig
from kvhive.config.fields import flag_of
from kvhive.errors import ConfigError

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PUBLIC_PATHS = frozenset({"/", "/healthcheck"})
"""Paths open without an API key (liveness), as in lmcache 0.5.7."""
API_KEY_HEADER = "x-lmcache-api-key"


# -- API keys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKeys:
    """The accepted API keys (never shown: ``repr`` gives only their count)."""

    keys: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def accepts(self, presented: Iterable[str | None]) -> bool:
        """Whether any presented value equals a key (every comparison runs, constant time)."""
        matched = False
        for value in presented:
            if value:
                token = value.encode()
                for key in self.keys:
                    matched |= hmac.compare_digest(token, key)
        return matched

    def __repr__(self) -> str:
        return f"ApiKeys(enabled={self.enabled}, count={len(self.keys)})"


def _read_key(source: str, path: str) -> bytes:
    """The key in ``path``: one non-empty line.  ``source`` names the flag or variable."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, f"{path!r} cannot be read ({exc})") from None
    if not text:
        raise ConfigError(source, f"{path!r} is empty (an API key file holds one key)")
    if len(text.splitlines()) != 1:
        raise ConfigError(source, f"{path!r} must hold one key on one line")
    return text.encode()


def _env(new: str, legacy: str) -> tuple[str, str | None]:
    """The variable in force and its value: ``new`` when set and non-empty, else ``legacy``."""
    value = getattr(envs, new)
    if value:
        return new, value
    return legacy, getattr(envs, legacy) or None


def load_api_keys(config: HTTPAdminConfig, *, admin_token: bool = True) -> ApiKeys:
    """Every configured API key, in order: ``--api-key-file`` files, the key-file variable,
    the key variable; plus the admin token when ``admin_token`` and one is set (it may read
    everything too).  Raises :class:`ConfigError` for a bad key file."""
    flag = flag_of(HTTPAdminConfig, "api_key_files")
    keys = [_read_key(flag, path) for path in config.api_key_files]
    file_var, key_file = _env("LMCACHE_API_KEY_FILE", "LMCACHE_HTTP_API_KEY_FILE")
    if key_file:
        keys.append(_read_key(file_var, key_file))
    _, key = _env("LMCACHE_API_KEY", "LMCACHE_HTTP_API_KEY")
    if key:
        keys.append(key.encode())
    if not keys:
        return ApiKeys()
    if admin_token and config.api_token:
        keys.append(config.api_token.encode())
    return ApiKeys(tuple(keys))


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` value, else None."""
    if not authorization:
        return None
    scheme, sep, token = authorization.partition(" ")
    if not sep or scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuth:
    """ASGI middleware: with API keys configured, a request to any path but
    :data:`PUBLIC_PATHS` needs one (module docstring).  Keys: ``app.state.api_keys``."""

    def __init__(self, app: ASGIApp, public_paths: Sequence[str] = tuple(PUBLIC_PATHS)) -> None:
        self.app = app
        self.public = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        keys: ApiKeys = scope["app"].state.api_keys
        if keys.enabled:
            headers = Headers(scope=scope)
            presented = (bearer(headers.get("authorization")), headers.get(API_KEY_HEADER))
            if not keys.accepts(presented):
                response = JSONResponse(
                    {"detail": "Invalid or missing API key"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- the admin token ---------------------------------------------------------------------------


def is_mutation(request: Request) -> bool:
    if request.method in MUTATING:
        return True
    return request.url.path == "/loglevel" and "level" in request.query_params


def presented_tokens(request: Request) -> tuple[str | None, str | None]:
    """The admin-token candidates: the Bearer token and ``X-API-Token``."""
    return bearer(request.headers.get("authorization")), request.headers.get("x-api-token")


def require_token(request: Request) -> None:
    """Router dependency: reject unauthenticated mutations when a token is configured."""
    token = request.app.state.server.config.http_admin.api_token
    if not token or not is_mutation(request):
        return
    if not ApiKeys((token.encode(),)).accepts(presented_tokens(request)):
        raise HTTPException(
            401,
            "this endpoint changes server state and needs the --http-api-token "
            "(Authorization: Bearer TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
