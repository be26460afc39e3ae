"""``fault_inject``: wraps another adapter and breaks it on purpose (tests, drills).

JSON (reference fields): ``inner`` (the wrapped adapter's JSON), ``rate`` (0..1), ``seed``,
``gap_indices``, ``gap_tail_ratios``; they clear load results exactly as the reference does:
a key is dropped when BLAKE2b-64 of ``"{seed}:{hash hex}:{model}:{kv_rank}:{group}:{salt}"``
(big-endian) mod 10^6 is below ``int(rate * 10^6)``; ``gap_indices`` drop positions of a
load batch; ratio r drops position ``round((1 - r) * (n - 1))``.

kvhive extensions for slow and failing backends: ``store_delay_ms``, ``lookup_delay_ms``,
``load_delay_ms`` postpone each task (the inner call runs after the delay, so a late load
still writes its buffer late — the controllers must keep it reserved), and ``fail_ops``
(subset of store, lookup, load, delete) makes those tasks fail.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from kvhive.config.l2_adapters import FaultInjectAdapterConfig
from kvhive.errors import L2Error
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import L2Adapter
from kvhive.storage.l2.futures import MISSING, Outcome, failed, results, then


class FaultInjectAdapter(L2Adapter):
    """Wraps ``inner`` and alters its tasks as ``cfg`` says (module docstring)."""

    def __init__(self, inner: L2Adapter, cfg: FaultInjectAdapterConfig) -> None:
        self.inner = inner
        self.durable = inner.durable
        self.cfg = cfg
        self._threshold = int(cfg.rate * 1_000_000)
        self._delay_s = {"store": cfg.store_delay_ms / 1000.0, "lookup": cfg.lookup_delay_ms / 1000.0,
                         "load": cfg.load_delay_ms / 1000.0}  # fmt: skip
        self._timers: dict[threading.Timer, Future] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.dropped = 0

    # -- faults -----------------------------------------------------------------------

    def _dropped(self, key: ObjectKey) -> bool:
        ident = (f"{self.cfg.seed}:{key.chunk_hash.hex()}:{key.model_name}:{key.kv_rank}:"
                 f"{key.object_group_id}:{key.cache_salt}")  # fmt: skip
        digest = hashlib.blake2b(ident.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % 1_000_000 < self._threshold

    def _gaps(self, n: int) -> set[int]:
        gaps = {i for i in self.cfg.gap_indices if i < n}
        if n:
            gaps |= {round((1 - r) * (n - 1)) for r in self.cfg.gap_tail_ratios}
        return gaps

    def _run(self, op: str, call: Callable[[], Future]) -> Future:
        if op in self.cfg.fail_ops:
            return failed(L2Error(f"injected {op} failure"))
        delay = self._delay_s.get(op, 0.0)
        if not delay:
            return call()
        out: Future = Future()

        def fire() -> None:
            with self._lock:
                if self._timers.pop(timer, None) is None:
                    return  # closed: already failed
            try:
                inner = call()
            except Exception as exc:  # noqa: BLE001 - task boundary: the caller sees a failed task
                out.set_exception(exc)
                return
            inner.add_done_callback(lambda f: _copy(f, out))

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            self._timers[timer] = out
        timer.start()
        return out

    # -- contract ---------------------------------------------------------------------

    def submit_store(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Future:
        return self._run("store", lambda: self.inner.submit_store(keys, buffers))

    def submit_lookup(self, keys: Sequence[ObjectKey]) -> Future:
        return self._run("lookup", lambda: self.inner.submit_lookup(keys))

    def submit_load(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Future:
        fut = self._run("load", lambda: self.inner.submit_load(keys, buffers))
        return then(fut, lambda f: self._alter(keys, results(f, len(keys))))

    def _alter(self, keys: Sequence[ObjectKey], result: list[Outcome]) -> list[Outcome]:
        """Drop (as MISSING, the reference's "not found") the keys the faults name; the
        inner adapter's own failures keep their reasons."""
        gaps = self._gaps(len(keys))
        out: list[Outcome] = [
            ok if not ok else (MISSING if i in gaps or self._dropped(k) else True)
            for i, (k, ok) in enumerate(zip(keys, result, strict=True))
        ]
        self.dropped += sum(a and not b for a, b in zip(result, out, strict=True))
        return out

    def submit_delete(self, keys: Sequence[ObjectKey]) -> Future:
        return self._run("delete", lambda: self.inner.submit_delete(keys))

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        return self.inner.scan()

    @property
    def capacity_bytes(self) -> int:
        return self.inner.capacity_bytes

    def footprint(self, nbytes: int) -> int:
        return self.inner.footprint(nbytes)

    def status(self) -> dict[str, Any]:
        return {**self.inner.status(), "fault_inject": {"rate": self.cfg.rate, "dropped_loads": self.dropped,
                "fail_ops": list(self.cfg.fail_ops)}}  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, {}
        for timer, out in timers.items():
            timer.cancel()
            out.set_exception(L2Error("adapter closed"))
        self.inner.close()


def _copy(src: Future, dst: Future) -> None:
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())
    else:
        dst.set_result(src.result())


def build(cfg: FaultInjectAdapterConfig, inner: L2Adapter) -> L2Adapter:
    """A wrapper's builder: the registry builds ``cfg.inner`` first and passes it in."""
    return FaultInjectAdapter(inner, cfg)
