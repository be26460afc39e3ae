"""``kvhive server`` lifecycle, the composition root: build the server, serve HTTP in the main
thread (uvicorn handles SIGINT/SIGTERM), then shut everything down in order.

It lives in ``kvhive.cli``, above ``kvhive.http`` and ``kvhive.server``: http may import
server, server never imports http (the import contracts in pyproject.toml).

Runtime plugins start once uvicorn listens (so they can call the HTTP API at once);
shutdown is plugins → event bus flush → engine (``KvhiveServer.close``)."""

from __future__ import annotations

import gc
import logging
import signal
import threading

import uvicorn

from kvhive.cli.diagnostics import Diagnostics
from kvhive.config import ServerConfig
from kvhive.http.app import create_app, load_api_keys
from kvhive.server.core import KvhiveServer

log = logging.getLogger(__name__)


# The collector's default (700, 10, 10) runs a full pass over the whole heap (object table,
# locks, sessions: millions of objects on a big L1) every ~70k container allocations, which
# a single long lookup makes.  Rarer passes cost the same in total and keep such pauses off
# request latency; nothing here relies on prompt cycle collection.
GC_THRESHOLDS = (50_000, 20, 100)


def serve(config: ServerConfig) -> int:
    api_keys = load_api_keys(config.http_admin)  # a bad key file exits 2 before anything binds
    for note in config.compat.notes():
        log.info("%s", note)
    server = KvhiveServer(config)
    diagnostics = Diagnostics(config.observability, server.status)
    try:
        server.start()
        diagnostics.start()
        app = create_app(server, api_keys=api_keys)
        if api_keys.enabled:
            log.info("HTTP API keys: %d accepted; every path but / and /healthcheck needs one",
                     len(api_keys.keys))  # fmt: skip
        gc.collect()
        gc.freeze()  # start-up objects live for the whole run: never scan them again
        gc.set_threshold(*GC_THRESHOLDS)
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
        if config.plugins.locations:
            threading.Thread(
                target=_start_plugins_when_listening, args=(uv, server), daemon=True
            ).start()
        # uvicorn re-raises a caught SIGTERM after its own shutdown; with the default handler
        # that would kill the process before ``server.close()`` (plugins, bus flush, engine).
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _ignore) if on_main else None
        try:
            uv.run()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return 0 if uv.started else 1
    finally:
        diagnostics.stop()
        server.close()


def _start_plugins_when_listening(uv: uvicorn.Server, server: KvhiveServer) -> None:
    while not uv.started:
        if uv.should_exit:
            return
        threading.Event().wait(0.05)
    server.plugins.start()


def _ignore(signum: int, frame: object) -> None:
    """SIGTERM after uvicorn's graceful shutdown: fall through to ``server.close()``."""
