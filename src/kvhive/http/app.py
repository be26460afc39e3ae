"""The HTTP admin app (FastAPI).  Routes are thin: they read or call the server."""

from __future__ import annotations

from fastapi import FastAPI

from kvhive import __version__
from kvhive.http.routes import ROUTERS
from kvhive.server.core import KvhiveServer


def create_app(server: KvhiveServer) -> FastAPI:
    app = FastAPI(title="kvhive HTTP API", version=__version__)
    app.state.server = server
    for router in ROUTERS:
        app.include_router(router)
    return app
