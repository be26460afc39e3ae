"""Server modules: out-of-tree handlers behind ``server_module_call`` and
``server_module_affinity_call`` (``--server-module``; the API is ``docs/server-modules.md``).

A server module is a Python module with a factory (``build_server_modules`` unless the
spec's ``factory_name`` says otherwise).  At start the server imports each module in flag
order and calls ``factory(ctx)`` with a :class:`ServerModuleContext`; the factory returns an
object, a sequence of objects, or None.  Methods of those objects marked with :func:`handler`
serve namespaced methods::

    class Echo:
        @handler("demo.echo")
        def echo(self, payload: bytes) -> bytes:
            return payload

A handler takes the request's payload bytes and returns bytes.  ``handler(...,
affinity=True)`` puts it behind ``server_module_affinity_call``: it runs on the calling
connection's affinity thread, in order with that connection's stores and retrieves; the
others run on the CPU pool (several at once: they must be thread-safe).  Methods marked with
LMCache's own ``server_module_handler`` decorator are served too (the marker is read by duck
typing; lmcache is never imported).  An object's optional ``close()`` runs at shutdown and its
optional ``report_status()`` is shown in ``/status``.

Answers follow the reference: an unknown method, or one served by the other call, is
``success=False`` with ``"unknown server module method: M"`` or ``"server module method M is
served by server_module_affinity_call"``; a handler that raises is ``success=False`` with the
exception's message (and logged); nothing here raises into the request path.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvhive.config import ServerConfig
from kvhive.config.server_modules import FLAG, ServerModuleSpec
from kvhive.errors import ConfigError
from kvhive.wire.types import ServerModuleCallRequest, ServerModuleCallResponse

log = logging.getLogger(__name__)

MARK = "__kvhive_server_module_handler__"
LMCACHE_MARK = "__lmcache_server_module_handler__"
"""The attribute LMCache's ``server_module_handler`` decorator sets (``.method``, and in
0.5.7 ``.requires_client_affinity``)."""

CALL = "server_module_call"
AFFINITY_CALL = "server_module_affinity_call"

Handler = Callable[[bytes], Any]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class HandlerMark:
    """What :func:`handler` records on a method."""

    method: str
    affinity: bool = False


def handler(method: str, *, affinity: bool = False) -> Callable[[F], F]:
    """Mark a module method as the handler of ``method`` (namespaced: ``"pkg.name"``)."""
    if not isinstance(method, str) or "." not in method.strip(".") or method != method.strip():
        raise ValueError(
            f"server module method must be namespaced like 'pkg.name' (got {method!r})"
        )

    def mark(func: F) -> F:
        setattr(func, MARK, HandlerMark(method, affinity))
        return func

    return mark


@dataclass(frozen=True)
class ServerModuleContext:
    """What a factory gets: its spec's ``config`` object and the server's configuration."""

    config: Mapping[str, Any]
    server_config: ServerConfig
    module_path: str


class ServerModules:
    """The loaded modules' handlers (module docstring).  Immutable after construction."""

    def __init__(
        self,
        handlers: Mapping[str, Handler] | None = None,
        affinity_handlers: Mapping[str, Handler] | None = None,
        objects: Sequence[object] = (),
    ) -> None:
        self._handlers = dict(handlers or {})
        self._affinity = dict(affinity_handlers or {})
        self._objects = tuple(objects)

    def call(self, request: ServerModuleCallRequest) -> ServerModuleCallResponse:
        """``server_module_call`` (on the CPU pool)."""
        return self._serve(self._handlers, request)

    def affinity_call(self, request: ServerModuleCallRequest) -> ServerModuleCallResponse:
        """``server_module_affinity_call`` (on the caller's affinity thread)."""
        return self._serve(self._affinity, request)

    def _serve(
        self, handlers: Mapping[str, Handler], request: ServerModuleCallRequest
    ) -> ServerModuleCallResponse:
        fn = handlers.get(request.method)
        if fn is None:
            return ServerModuleCallResponse(False, b"", self._not_here(request.method))
        try:
            result = fn(request.payload)
            if not isinstance(result, (bytes, bytearray, memoryview)):
                raise TypeError(f"handler returned {type(result).__name__}, not bytes")
            return ServerModuleCallResponse(True, bytes(result), "")
        except Exception as exc:  # the module's failure becomes its answer, never silence
            log.exception("server module method %s failed", request.method)
            return ServerModuleCallResponse(False, b"", str(exc) or type(exc).__name__)

    def _not_here(self, method: str) -> str:
        if method in self._handlers:
            return f"server module method {method} is served by {CALL}"
        if method in self._affinity:
            return f"server module method {method} is served by {AFFINITY_CALL}"
        return f"unknown server module method: {method}"

    def status(self) -> dict[str, Any]:
        """The ``/status`` view: methods per call and each object's ``report_status()``."""
        reports = []
        for obj in self._objects:
            report = getattr(obj, "report_status", None)
            if callable(report):
                try:
                    reports.append(report())
                except Exception as exc:  # noqa: BLE001 - a module's status must not fail /status
                    reports.append({"error": f"{type(exc).__name__}: {exc}"})
        return {
            "methods": sorted(self._handlers),
            "affinity_methods": sorted(self._affinity),
            "modules": reports,
        }

    def close(self) -> None:
        """Call every object's optional ``close()`` (in reverse load order; failures logged)."""
        for obj in reversed(self._objects):
            close = getattr(obj, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # shutdown goes on
                    log.exception("closing server module %s failed", type(obj).__name__)


def _marks(obj: object) -> Iterator[tuple[HandlerMark, Handler]]:
    """The handlers of ``obj``: kvhive's mark, or LMCache's (duck typed)."""
    for name, member in inspect.getmembers(type(obj), predicate=callable):
        mark = getattr(member, MARK, None)
        if mark is None:
            theirs = getattr(member, LMCACHE_MARK, None)
            method = getattr(theirs, "method", None)
            if not isinstance(method, str):
                continue
            mark = HandlerMark(method, bool(getattr(theirs, "requires_client_affinity", False)))
        yield mark, getattr(obj, name)


def _objects_of(produced: Any) -> list[object]:
    if produced is None:
        return []
    if isinstance(produced, Sequence) and not isinstance(produced, (str, bytes)):
        return list(produced)
    return [produced]


def load_server_modules(
    specs: Sequence[ServerModuleSpec], server_config: ServerConfig
) -> ServerModules:
    """Import each spec's module, call its factory and collect the handlers.  Any failure
    (import, missing factory, factory error, duplicate method) raises :class:`ConfigError`
    naming ``--server-module``, after closing the objects already built."""
    handlers: dict[str, Handler] = {}
    affinity: dict[str, Handler] = {}
    objects: list[object] = []
    try:
        for i, spec in enumerate(specs):
            where = f"#{i} ({spec.module_path})"
            try:
                module = importlib.import_module(spec.module_path)
            except Exception as exc:  # noqa: BLE001 - any import failure is the module's: named
                raise ConfigError(FLAG, f"{where}: cannot import: {exc}") from None
            factory = getattr(module, spec.factory_name, None)
            if not callable(factory):
                raise ConfigError(FLAG, f"{where}: no factory function '{spec.factory_name}'")
            ctx = ServerModuleContext(spec.config, server_config, spec.module_path)
            try:
                produced = factory(ctx)
            except Exception as exc:  # noqa: BLE001 - the factory's failure, named
                raise ConfigError(
                    FLAG, f"{where}: {spec.factory_name}() failed: {type(exc).__name__}: {exc}"
                ) from None
            for obj in _objects_of(produced):
                objects.append(obj)
                for mark, fn in _marks(obj):
                    if mark.method in handlers or mark.method in affinity:
                        raise ConfigError(
                            FLAG, f"{where}: method '{mark.method}' is served by two modules"
                        )
                    (affinity if mark.affinity else handlers)[mark.method] = fn
    except BaseException:
        ServerModules(objects=objects).close()
        raise
    modules = ServerModules(handlers, affinity, objects)
    if objects:
        log.info(
            "server modules: %d object(s); methods %s; affinity methods %s",
            len(objects),
            sorted(handlers) or "none",
            sorted(affinity) or "none",
        )
    return modules
