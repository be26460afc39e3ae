"""Dispatch: decode a request, run its handler on the right pool, always reply.

Every frame that carries a uid gets an answer (protocol.md §5, §23): the result,
the operation's soft-failure value when the request decoded but cannot be served,
or an error reply (see ``kvhive.wire.codec``) when it cannot even be decoded.

One failure path: a handler that cannot serve a request raises (``TransferFailed``,
``BadRequest``, ...); ``_failure`` turns that into the op's soft value, counted once in
``soft_failures[op]``, or into an error reply for ops without one, counted in ``errors``.
Handlers return domain results; their route's ``reply`` makes the wire value of them.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial

from kvhive.errors import KvhiveError, ProtocolError
from kvhive.server.handlers import Route
from kvhive.server.pools import AffinityPool, CpuPool
from kvhive.wire import codec
from kvhive.wire.ops import OPS, AfterReply, OpSpec, Pool

log = logging.getLogger(__name__)

Reply = Callable[[list[bytes]], None]


class Dispatcher:
    """Maps op names to routes and pools.  ``handle`` is called on the loop thread."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        affinity: AffinityPool,
        cpu: CpuPool,
    ) -> None:
        missing = sorted(set(OPS) - set(routes))
        extra = sorted(set(routes) - set(OPS))
        if missing or extra:
            raise ValueError(f"routes do not match the op table: missing {missing}, extra {extra}")
        self._routes = dict(routes)
        self._affinity = affinity
        self._pools: dict[Pool, AffinityPool | CpuPool] = {Pool.AFFINITY: affinity, Pool.CPU: cpu}
        self._lock = threading.Lock()
        # CPU-pool jobs queued or running per connection.  A lookup small enough to run
        # inline still goes to the pool behind them: a client's free_lookup_locks or
        # end_session (sent without waiting) must not be overtaken by its next lookup.
        self._cpu_pending: dict[bytes, int] = {}
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.soft_failures: Counter[str] = Counter()

    def handle(
        self, identity: bytes, uid: bytes, op_frame: bytes, args: list[bytes], reply: Reply
    ) -> None:
        """Route one request.  Only the op frame is decoded here; arguments are decoded
        where the handler runs, so a large token list does not hold up the loop thread."""
        try:
            spec = codec.decode_op(op_frame)
        except ProtocolError as exc:
            self._reject(uid, exc, reply)
            return
        if spec.pool is Pool.INLINE or (
            spec.inline_max_bytes
            and identity not in self._cpu_pending  # never overtake this client's earlier ops
            and sum(map(len, args)) <= spec.inline_max_bytes
        ):
            self._run(spec, uid, op_frame, args, reply, True)
        elif spec.pool is Pool.CPU:
            with self._lock:
                self._cpu_pending[identity] = self._cpu_pending.get(identity, 0) + 1
            self._pools[Pool.CPU].submit(
                identity, partial(self._run_cpu, identity, spec, uid, op_frame, args, reply)
            )
        elif spec.farewell:
            self._affinity.submit(identity, partial(self._run_farewell, identity, spec, uid,
                                                    op_frame, args, reply))  # fmt: skip
        else:
            self._pools[spec.pool].submit(
                identity, partial(self._run, spec, uid, op_frame, args, reply, False)
            )

    def _run_farewell(
        self,
        identity: bytes,
        spec: OpSpec,
        uid: bytes,
        op_frame: bytes,
        args: list[bytes],
        reply: Reply,
    ) -> None:
        try:
            self._run(spec, uid, op_frame, args, reply, False)
        finally:
            self._affinity.forget(identity)  # takes effect once this job has ended

    def _run_cpu(
        self,
        identity: bytes,
        spec: OpSpec,
        uid: bytes,
        op_frame: bytes,
        args: list[bytes],
        reply: Reply,
    ) -> None:
        done = False

        def finish() -> None:
            nonlocal done
            if done:
                return
            done = True
            with self._lock:
                left = self._cpu_pending[identity] - 1
                if left:
                    self._cpu_pending[identity] = left
                else:
                    del self._cpu_pending[identity]

        def reply_last(parts: list[bytes]) -> None:
            finish()  # before the reply: the client's next request may follow it at once
            reply(parts)

        try:
            self._run(spec, uid, op_frame, args, reply_last, False)
        finally:
            finish()

    def _run(
        self,
        spec: OpSpec,
        uid: bytes,
        op_frame: bytes,
        args: list[bytes],
        reply: Reply,
        inline: bool,
    ) -> None:
        try:
            values = codec.decode_args(spec, args)
        except ProtocolError as exc:
            self._reject(uid, exc, reply)
            return
        self._count(self.requests, spec.name)
        rest = None
        route = self._routes[spec.name]
        try:
            result = route.call(*values)
            if isinstance(result, AfterReply):
                if inline:
                    rest = result.then
                else:
                    result.then()
                result = result.value
            frames = codec.encode_result(route.reply(result))
        except Exception as exc:  # noqa: BLE001 - request boundary: becomes a reply, never silence
            soft = self._failure(spec, exc)
            if soft is None:
                code = exc.code if isinstance(exc, KvhiveError) else "internal"
                reply([uid, *codec.error_frames(code, f"{spec.name}: {exc}")])
                return
            frames = soft
        reply([uid, op_frame, *frames])
        if rest is not None:
            try:
                rest()
            except Exception:
                log.exception("%s: work after the reply failed", spec.name)

    def _reject(self, uid: bytes, exc: ProtocolError, reply: Reply) -> None:
        self._count(self.errors, exc.code)
        log.warning("rejected request: %s", exc)
        reply([uid, *codec.error_frames(exc.code, str(exc))])

    def _failure(self, spec: OpSpec, exc: Exception) -> list[bytes] | None:
        """Soft-failure frames for ``exc``, or None when the op has no soft value."""
        if isinstance(exc, KvhiveError):
            log.warning("%s failed: %s", spec.name, exc)
        else:
            log.error("%s raised", spec.name)
        if not spec.has_soft:
            self._count(self.errors, spec.name)
            return None
        self._count(self.soft_failures, spec.name)
        return codec.encode_result(spec.soft)

    def _count(self, counter: Counter[str], key: str) -> None:
        with self._lock:
            counter[key] += 1

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "soft_failures": dict(self.soft_failures),
            }
