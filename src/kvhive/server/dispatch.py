"""Dispatch: decode a request, run its handler on the right pool, always reply.

Every frame that carries a uid gets an answer (protocol.md §5, §23): the result,
the operation's soft-failure value when the request decoded but cannot be served,
or an error reply (see ``kvhive.wire.codec``) when it cannot even be decoded.

One failure path: a handler that cannot serve a request raises (``TransferFailed``,
``BadRequest``, ...); ``_failure`` turns that into the op's soft value, counted once in
``soft_failures[op]``, or into an error reply for ops without one, counted in ``errors``.
Handlers return domain results; their route's ``reply`` makes the wire value of them.

No exception leaves the request path without a reply: decoding raises only
``ProtocolError`` (limits, nesting past the recursion limit and ``MemoryError`` included),
and a broad catch at each boundary (:meth:`Dispatcher.handle` on the loop thread,
``_run`` wherever the request runs) turns anything else into an ``internal`` error reply.

Streaming ops (``subscribe_kv_events``): decoded and run on the loop thread like an INLINE
op; the handler returns a :class:`~kvhive.server.streams.StreamSource` and the stream manager
(:attr:`Dispatcher.streams`, shared with the transport) sends its batches.  A request it
cannot serve (bad arguments) gets an error reply, as any other.

Bounded work per connection: a connection with ``MAX_OUTSTANDING_PER_CONNECTION`` requests
queued or running on the pools gets an immediate ``too_many_outstanding`` error reply for
the next pooled request instead of queueing more (a client that never reads its replies
cannot grow the queues without bound).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from kvhive.errors import KvhiveError, ProtocolError, TooManyOutstanding, UnsupportedError
from kvhive.server.handlers import Route
from kvhive.server.pools import AffinityPool, CpuPool
from kvhive.server.streams import MAX_STREAMS_PER_CONNECTION, Peer, StreamManager, StreamSource
from kvhive.wire import codec
from kvhive.wire.ops import OPS, AfterReply, OpSpec, Pool

log = logging.getLogger(__name__)

Reply = Callable[[list[bytes]], None]

# Pooled requests one connection may have queued or running.  vLLM batches up to 1024
# sequences (max_num_seqs); a worker has at most a store and a retrieve per running
# request in flight, plus lock releases, so an engine stays well under this.  A client
# past it is not reading its replies or floods: it gets an error reply at once.
MAX_OUTSTANDING_PER_CONNECTION = 2048

# Rejected requests logged per second at most (a flood of bad frames must not turn the
# loop thread into a log writer); the rest are counted and summarised.
_REJECT_LOGS_PER_S = 10


@dataclass(slots=True)
class _Outstanding:
    """One connection's pooled requests, queued or running."""

    cpu: int = 0  # on the CPU pool
    total: int = 0  # on either pool


class Dispatcher:
    """Maps op names to routes and pools.  ``handle`` is called on the loop thread."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        affinity: AffinityPool,
        cpu: CpuPool,
        max_outstanding: int = MAX_OUTSTANDING_PER_CONNECTION,
        streams: StreamManager | None = None,
    ) -> None:
        missing = sorted(set(OPS) - set(routes))
        extra = sorted(set(routes) - set(OPS))
        if missing or extra:
            raise ValueError(f"routes do not match the op table: missing {missing}, extra {extra}")
        self._routes = dict(routes)
        self._affinity = affinity
        self._cpu = cpu
        self._max_outstanding = max_outstanding
        # Server-push streams; the transport routes their control frames and pumps them.
        self.streams = streams if streams is not None else StreamManager()
        self._lock = threading.Lock()
        # Pooled jobs queued or running per connection (entries go when they reach 0).  A
        # lookup small enough to run inline still goes to the CPU pool behind the
        # connection's CPU jobs: a client's free_lookup_locks or end_session (sent without
        # waiting) must not be overtaken by its next lookup.
        self._pending: dict[bytes, _Outstanding] = {}
        self._peak_outstanding = 0
        self._log_window = 0.0  # monotonic second of the reject-log budget
        self._log_budget = _REJECT_LOGS_PER_S
        self._log_skipped = 0
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.soft_failures: Counter[str] = Counter()

    def handle(
        self, identity: bytes, uid: bytes, op_frame: bytes, args: list[bytes], reply: Reply
    ) -> None:
        """Route one request.  Only the op frame is decoded here (and an INLINE op's few
        argument bytes); pooled arguments are size-checked here and decoded where the
        handler runs, so a large token list does not hold up the loop thread."""
        try:
            spec = codec.decode_op(op_frame)
            if spec.pool is not Pool.INLINE:
                codec.check_frames(spec, args)
        except ProtocolError as exc:
            self._reject(uid, exc, reply)
            return
        except Exception as exc:  # noqa: BLE001 - request boundary: becomes a reply
            self._internal("request", uid, exc, reply)
            return
        if spec.streaming:
            self._open_stream(identity, spec, uid, op_frame, args, reply)
            return
        pending = self._pending.get(identity)
        if spec.pool is Pool.INLINE or (
            spec.inline_max_bytes
            and (pending is None or not pending.cpu)  # never overtake this client's CPU ops
            and sum(map(len, args)) <= spec.inline_max_bytes
        ):
            self._run(spec, uid, op_frame, args, reply, True)
            return
        cpu = spec.pool is Pool.CPU
        if not self._admit(identity, cpu):
            self._reject(
                uid,
                TooManyOutstanding(
                    f"too many outstanding requests: this connection has "
                    f"{self._max_outstanding} queued or running; read the replies first"
                ),
                reply,
            )
            return
        job = partial(self._run_pooled, identity, spec, uid, op_frame, args, reply)
        if cpu:
            self._cpu.submit(identity, job)
        else:
            self._affinity.submit(identity, job)

    def _admit(self, identity: bytes, cpu: bool) -> bool:
        """Count a pooled job of ``identity`` in, unless it is at the limit."""
        with self._lock:
            p = self._pending.get(identity)
            if p is None:
                p = self._pending[identity] = _Outstanding()
            elif p.total >= self._max_outstanding:
                return False
            p.total += 1
            p.cpu += cpu
            self._peak_outstanding = max(self._peak_outstanding, p.total)
            return True

    def _release(self, identity: bytes, cpu: bool) -> None:
        with self._lock:
            p = self._pending[identity]
            p.total -= 1
            p.cpu -= cpu
            if not p.total:
                del self._pending[identity]

    def _run_pooled(
        self,
        identity: bytes,
        spec: OpSpec,
        uid: bytes,
        op_frame: bytes,
        args: list[bytes],
        reply: Reply,
    ) -> None:
        cpu = spec.pool is Pool.CPU
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                self._release(identity, cpu)

        def reply_last(parts: list[bytes]) -> None:
            finish()  # before the reply: the client's next request may follow it at once
            reply(parts)

        try:
            self._run(spec, uid, op_frame, args, reply_last, False)
        finally:
            finish()
            if spec.farewell:
                self._affinity.forget(identity)  # takes effect once this job has ended

    def _run(
        self,
        spec: OpSpec,
        uid: bytes,
        op_frame: bytes,
        args: list[bytes],
        reply: Reply,
        inline: bool,
    ) -> None:
        values = self._decode(spec, uid, args, reply)
        if values is None:
            return
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

    def _decode(
        self, spec: OpSpec, uid: bytes, args: list[bytes], reply: Reply
    ) -> list[Any] | None:
        """The request's argument values (counted as a request), or None once an error
        reply has been sent for arguments that do not decode."""
        try:
            values = codec.decode_args(spec, args)
        except ProtocolError as exc:
            self._reject(uid, exc, reply)
            return None
        except Exception as exc:  # noqa: BLE001 - request boundary: becomes a reply
            self._internal(spec.name, uid, exc, reply)
            return None
        self._count(self.requests, spec.name)
        return values

    def _open_stream(
        self,
        identity: bytes,
        spec: OpSpec,
        uid: bytes,
        op_frame: bytes,
        args: list[bytes],
        reply: Reply,
    ) -> None:
        """A streaming op, on the loop thread: the handler gives the stream's source, the
        stream manager sends its first batch at once and the rest on the client's credit."""
        values = self._decode(spec, uid, args, reply)
        if values is None:
            return
        if self.streams.full(identity):
            self._reject(
                uid,
                TooManyOutstanding(
                    f"{spec.name}: this connection has {MAX_STREAMS_PER_CONNECTION} open "
                    "streams; cancel one first"
                ),
                reply,
            )
            return
        try:
            if not isinstance(reply, Peer):
                raise UnsupportedError("streams need the ZMQ transport")
            source = self._routes[spec.name].call(*values)
            if not isinstance(source, StreamSource):
                raise TypeError(f"handler returned {type(source).__name__}, not a stream")
        except Exception as exc:  # noqa: BLE001 - request boundary: becomes a reply, never silence
            self._failure(spec, exc)
            code = exc.code if isinstance(exc, KvhiveError) else "internal"
            reply([uid, *codec.error_frames(code, f"{spec.name}: {exc}")])
            return
        self.streams.open(identity, uid, op_frame, source, reply)

    def _reject(self, uid: bytes, exc: KvhiveError, reply: Reply) -> None:
        self._count(self.errors, exc.code)
        self._log_reject(exc)
        reply([uid, *codec.error_frames(exc.code, str(exc))])

    def _internal(self, what: str, uid: bytes, exc: Exception, reply: Reply) -> None:
        """A request that failed outside its handler for a reason no check foresaw."""
        self._count(self.errors, "internal")
        log.error("%s: request failed before its handler ran", what, exc_info=exc)
        reply([uid, *codec.error_frames("internal", f"{what}: {type(exc).__name__}: {exc}")])

    def _log_reject(self, exc: KvhiveError) -> None:
        """Log a rejected request, at most ``_REJECT_LOGS_PER_S`` a second."""
        now = time.monotonic()
        with self._lock:
            if now - self._log_window >= 1.0:
                skipped, self._log_skipped = self._log_skipped, 0
                self._log_window, self._log_budget = now, _REJECT_LOGS_PER_S
            else:
                skipped = 0
            allowed = self._log_budget > 0
            if allowed:
                self._log_budget -= 1
            else:
                self._log_skipped += 1
        if skipped:
            log.warning("%d more rejected request(s) were not logged", skipped)
        if allowed:
            log.warning("rejected request: %s", exc)

    def _failure(self, spec: OpSpec, exc: Exception) -> list[bytes] | None:
        """Soft-failure frames for ``exc``, or None when the op has no soft value."""
        if isinstance(exc, KvhiveError):
            log.warning("%s failed: %s", spec.name, exc)
        else:
            log.error("%s raised", spec.name, exc_info=exc)
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

    def outstanding(self) -> dict[str, int]:
        """Pooled requests queued or running per connection: the limit, the largest count
        now, the largest ever seen, the connections with any, and the requests refused."""
        with self._lock:
            return {
                "limit": self._max_outstanding,
                "max": max((p.total for p in self._pending.values()), default=0),
                "peak": self._peak_outstanding,
                "connections": len(self._pending),
                "refused": self.errors[TooManyOutstanding.code],
            }
