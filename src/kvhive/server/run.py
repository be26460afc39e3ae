"""``kvhive server`` lifecycle: build the server, serve HTTP in the main thread
(uvicorn handles SIGINT/SIGTERM), then shut everything down in order."""

from __future__ import annotations

import logging

import uvicorn

from kvhive.config import ServerConfig
from kvhive.http.app import create_app
from kvhive.server.core import KvhiveServer

log = logging.getLogger(__name__)


def serve(config: ServerConfig) -> int:
    server = KvhiveServer(config)
    try:
        server.start()
        app = create_app(server)
        uv = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.http.host,
                port=config.http.port,
                log_level=logging.getLevelName(
                    logging.getLogger("kvhive").getEffectiveLevel()
                ).lower(),
                access_log=False,
                lifespan="off",
            )
        )
        log.info("HTTP API on http://%s:%d", config.http.host, config.http.port)
        uv.run()
        return 0 if uv.started else 1
    finally:
        server.close()
