"""HTTP routers; each module exposes ``router``.  ``ROUTERS`` lists what the app mounts.

Add a new module's router to ``MODULE_ROUTERS``: every router is mounted behind
:func:`kvhive.http.routes._auth.require_token`, so its mutating endpoints honour
``--http-api-token`` without per-route code.
"""

from fastapi import APIRouter, Depends

from kvhive.http.routes import cache, dashboard, info, loglevel, metrics, quota
from kvhive.http.routes._auth import require_token

MODULE_ROUTERS = [
    info.router,
    cache.router,
    metrics.router,
    loglevel.router,
    dashboard.router,
    quota.router,
]


def _guarded(router: APIRouter) -> APIRouter:
    outer = APIRouter(dependencies=[Depends(require_token)])
    outer.include_router(router)
    return outer


ROUTERS = [_guarded(r) for r in MODULE_ROUTERS]
