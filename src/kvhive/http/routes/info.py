"""Information endpoints: /, /healthcheck, /version, /status, /config."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from kvhive import __version__
from kvhive.http.deps import ServerDep

router = APIRouter()


@router.get("/")
def root() -> dict[str, str]:
    return {"status": "ok", "service": "kvhive HTTP API"}


@router.get("/healthcheck")
def healthcheck(server: ServerDep) -> JSONResponse:
    if server.l1.stats().healthy:
        return JSONResponse({"status": "healthy"})
    return JSONResponse({"status": "unhealthy", "reason": "L1 allocator check failed"}, 503)


@router.get("/version")
def version() -> str:
    return f"{__version__}-NA"


@router.get("/status")
def status(server: ServerDep) -> dict[str, Any]:
    return server.status()


@router.get("/config")
def config(server: ServerDep) -> dict[str, Any]:
    return server.config.to_dict()
