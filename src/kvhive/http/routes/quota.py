"""Per-``cache_salt`` quotas (``/quota``), in the reference's shapes.

Quotas never block writes; they steer IsolatedLRU eviction (L1 and L2 adapters) at its next
pass.  "GB" means GiB; limits are stored as ``int(limit_gb * 2**30)`` bytes.  The empty
salt is spelled ``_default`` in paths and answers (so a real salt ``_default`` cannot be
addressed on its own — the reference's rule).  Usage sums the L2 adapters' per-salt bytes.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kvhive.keys import validate_salt

router = APIRouter()

DEFAULT_SALT = "_default"
GiB = 1024**3
MAX_LIMIT_GB = float(2**30)  # 1 EiB: far above any tier, and int(limit * GiB) stays exact


def _unescape(salt: str) -> str:
    return "" if salt == DEFAULT_SALT else salt


def _escape(salt: str) -> str:
    return DEFAULT_SALT if salt == "" else salt


def _server(request: Request) -> Any:
    return getattr(request.app.state, "server", None)


def _not_ready() -> JSONResponse:
    return JSONResponse({"error": "engine not initialized"}, status_code=503)


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


def _usage(server: Any) -> dict[str, int]:
    l2 = getattr(server, "l2", None)
    return l2.usage_by_salt() if l2 is not None else {}


@router.put("/quota/{cache_salt}")
async def set_quota(cache_salt: str, request: Request) -> Any:
    server = _server(request)
    if server is None:
        return _not_ready()
    try:
        body = await request.json()
    except ValueError:
        return _bad("invalid JSON body")
    if not isinstance(body, dict) or "limit_gb" not in body:
        return _bad("body must be {'limit_gb': <float>}")
    raw = body["limit_gb"]
    try:
        if isinstance(raw, bool):
            raise TypeError(raw)
        limit_gb = float(raw)
    except (TypeError, ValueError, OverflowError):
        return _bad("limit_gb must be numeric")
    if not math.isfinite(limit_gb):
        return _bad("limit_gb must be finite")
    if not 0 <= limit_gb <= MAX_LIMIT_GB:
        return _bad(f"limit_gb must be in 0..{MAX_LIMIT_GB:.0f} (GiB)")
    salt = _unescape(cache_salt)
    try:
        validate_salt(salt)
    except ValueError as exc:
        return _bad(f"cache_salt: {exc}")
    server.quotas.set(salt, int(limit_gb * GiB))
    return {"cache_salt": _escape(salt), "limit_gb": limit_gb, "status": "ok"}


@router.get("/quota/{cache_salt}")
def get_quota(cache_salt: str, request: Request) -> Any:
    server = _server(request)
    if server is None:
        return _not_ready()
    salt = _unescape(cache_salt)
    limit = server.quotas.get(salt)
    return {
        "cache_salt": _escape(salt),
        "limit_gb": (limit or 0) / GiB,
        "current_usage_gb": _usage(server).get(salt, 0) / GiB,
        "exists": limit is not None,
    }


@router.delete("/quota/{cache_salt}")
def delete_quota(cache_salt: str, request: Request) -> Any:
    server = _server(request)
    if server is None:
        return _not_ready()
    salt = _unescape(cache_salt)
    removed = server.quotas.delete(salt)
    return {"cache_salt": _escape(salt), "status": "removed" if removed else "not_found"}


@router.get("/quota")
def list_quotas(request: Request) -> Any:
    server = _server(request)
    if server is None:
        return _not_ready()
    usage = _usage(server)
    users = {
        _escape(salt): {"limit_gb": limit / GiB, "current_usage_gb": usage.get(salt, 0) / GiB}
        for salt, limit in server.quotas.items().items()
    }
    return {"users": users}
