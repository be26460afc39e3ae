"""A server module that loads in ``kvhive server`` and in ``lmcache server`` 0.5.6 alike.

In kvhive's environment its methods are marked with kvhive's ``handler``; in the reference's
(no kvhive there) with LMCache's own ``server_module_handler``.  The factory reads only
``ctx.config``, which both servers' build contexts have, and the object has what LMCache's
module contract checks (``context``, ``report_status``, ``close``).  0.5.6 has no affinity
call: there ``interop.ordered`` is a plain method.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Mark = Callable[[Callable[..., bytes]], Callable[..., bytes]]

try:
    from kvhive.server.modules import handler

    def _mark(method: str) -> Mark:
        return handler(method)

    def _affinity(method: str) -> Mark:
        return handler(method, affinity=True)

except ImportError:  # the reference server's environment
    from lmcache.v1.multiprocess.ext_server_module import server_module_handler

    def _mark(method: str) -> Mark:
        return server_module_handler(method)

    _affinity = _mark


class InteropModule:
    def __init__(self, ctx: Any) -> None:
        self.context = getattr(ctx, "server_context", None)
        self.prefix = str(ctx.config.get("prefix", "")).encode()
        self.calls = 0

    @_mark("interop.echo")
    def echo(self, payload: bytes) -> bytes:
        self.calls += 1
        return self.prefix + payload

    @_mark("interop.fail")
    def fail(self, payload: bytes) -> bytes:
        raise ValueError(f"interop failure for {payload.decode()}")

    @_mark("interop.thread")
    def thread(self, payload: bytes) -> bytes:
        return threading.current_thread().name.encode()

    @_affinity("interop.ordered")
    def ordered(self, payload: bytes) -> bytes:
        return b"ordered:" + threading.current_thread().name.encode() + b":" + payload

    def report_status(self) -> dict[str, Any]:
        return {"interop_calls": self.calls}

    def close(self) -> None:
        return None


def build_server_modules(ctx: Any) -> InteropModule:
    return InteropModule(ctx)
