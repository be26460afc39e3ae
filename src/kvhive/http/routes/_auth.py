"""Optional token protection of mutating endpoints (``--http-api-token``).

When a token is configured, every POST/PUT/PATCH/DELETE request, and a ``GET /loglevel`` that
sets a level, must carry ``Authorization: Bearer TOKEN`` (or ``X-API-Token: TOKEN``); otherwise
the answer is 401 ``{"detail": ...}``.  Reads stay open, as in the reference.  The comparison is
constant-time.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_mutation(request: Request) -> bool:
    if request.method in MUTATING:
        return True
    return request.url.path == "/loglevel" and "level" in request.query_params


def presented_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.headers.get("x-api-token", "")


def require_token(request: Request) -> None:
    """Router dependency: reject unauthenticated mutations when a token is configured."""
    token = request.app.state.server.config.http_admin.api_token
    if not token or not is_mutation(request):
        return
    if not hmac.compare_digest(presented_token(request).encode(), token.encode()):
        raise HTTPException(
            401,
            "this endpoint changes server state and needs the --http-api-token "
            "(Authorization: Bearer TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
