"""The HTTP admin app (FastAPI).  Routes are thin: they read or call the server.

Bad input is the caller's error, never a 500 and never a long wait:

* a request that does not validate is answered 422 with
  ``{"detail": [{"loc", "msg", "type"}], "error": "<field>: <message>"}``.  The offending
  input is not echoed back (FastAPI's default does, and a ``NaN`` in it made the reply
  itself fail as a 500);
* a request body over :data:`MAX_BODY_BYTES` is refused with 413 before it is parsed (the
  largest legitimate body, 10,000 keys to delete, is a few MB; a 56 MB key list used to
  keep a worker parsing for 14 s).

Authentication (``routes/_auth.py``): with API keys configured every path but ``/`` and
``/healthcheck`` needs one (lmcache 0.5.7); ``--http-api-token`` guards changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvhive import __version__
from kvhive.http.routes import ROUTERS
from kvhive.http.routes._auth import ApiKeyAuth, ApiKeys, load_api_keys
from kvhive.server.core import KvhiveServer

MAX_BODY_BYTES = 16 << 20
"""Largest request body the admin API reads (bytes)."""


def create_app(server: KvhiveServer, *, api_keys: ApiKeys | None = None) -> FastAPI:
    """The admin app for ``server``.  ``api_keys``: as :func:`load_api_keys` gives them
    (``kvhive server`` loads them before it starts, to fail early); None loads them here."""
    app = FastAPI(title="kvhive HTTP API", version=__version__)
    app.state.server = server
    app.state.api_keys = load_api_keys(server.config.http_admin) if api_keys is None else api_keys
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(ApiKeyAuth)  # outermost: a request without a key reads nothing
    for router in ROUTERS:
        app.include_router(router)
    return app


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by its Content-Length at once,
    else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI answers an HTTPException raised while reading
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"body: request body over {self.limit} bytes"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": self._message()}, status_code=413)
        await response(scope, receive, send)


def field_name(loc: Sequence[int | str]) -> str:
    """``("body", "keys", 3, "kv_rank")`` -> ``"keys[3].kv_rank"`` (``body``/``query`` dropped)."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every field that failed validation (see the module docstring)."""
    errors: list[dict[str, Any]] = [
        {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
         "msg": str(e.get("msg", "invalid")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]  # fmt: skip
    first: dict[str, Any] = errors[0] if errors else {"loc": [], "msg": "invalid", "type": ""}
    name = "body" if first["type"] == "json_invalid" else field_name(first["loc"])
    message = f"{name}: {first['msg']}"
    return JSONResponse({"detail": errors, "error": message}, status_code=422)
