"""The interprocess events of the lmcache-driven CUDA data path (protocol §6, §15.2).

Facts from the lmcache 0.5.6 worker (``platform/base/event_ipc.py``,
``platform/devices/cuda/timeline_semaphore_event_ipc.py``, ``multiprocess/futures.py``):

* Ahead of each ``store``/``retrieve`` the worker creates an interprocess event
  (``torch.cuda.Event(interprocess=True)``), records it on its current stream and sends
  the event's IPC handle as the request's ``event`` bytes: 64 bytes, a
  ``cudaIpcEventHandle_t``.  The server must order its copy after that event: import the
  handle and make the copy stream wait on it.  A CPU worker sends the literal
  ``b"stub_ipc_handle"``; an empty handle means there is nothing to wait for.
* The reply is ``[event_handle, ok]``.  The worker imports a non-empty handle with
  ``Event.from_ipc_handle(device, handle)`` when its future is first looked at
  (``query``/``wait``/``result``/``wait_on_stream``, possibly well after the reply), then
  makes its stream wait on it or synchronizes it.  An empty handle means "done when the
  reply arrives".
* With ``isolated_ipc`` the worker's event backend is a timeline semaphore over a CUDA
  memory handle instead: its handle is 81 bytes (a version byte of 1, a 64-byte
  ``cudaIpcMemHandle_t`` of a buffer of 8-byte slots, the slot's byte offset and the
  target sequence as two big-endian uint64), waited on with ``cuStreamWaitValue64``, and
  the worker would expect a handle of the same kind back.  This server does not speak
  it: such a handle is refused with :class:`~kvhive.errors.BadRequest` naming
  ``isolated_ipc``.

Lifetime contract of exported events (:class:`DeviceEvents`): CUDA makes any use of an
imported event undefined once the exporting process has destroyed it, and the worker
uses the handle only when it gets round to it.  So every recorded event is kept alive
until it has completed *and* is at least ``retain_s`` seconds old (default 300 s, the
worker's request timeout), at most ``max_events`` of them: past that bound the oldest
completed event goes first, and when none has completed the oldest is synchronized
(the host waits for it) before it goes, so the bound always holds and no event is
dropped while its copy still runs.  Imported worker events are kept for the last
``max_imports`` imports, so a stream wait enqueued on one never outlives it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kvhive.errors import BadRequest

log = logging.getLogger(__name__)

EVENT_HANDLE_BYTES = 64
"""``cudaIpcEventHandle_t``."""
NO_EVENT_HANDLES = (b"", b"stub_ipc_handle")
"""Handles that carry no device work to wait for (none at all; a CPU worker's stub)."""
TIMELINE_HANDLE_BYTES = 81
"""An ``isolated_ipc`` timeline-semaphore handle: version byte, mem handle, offset, seq."""
DEFAULT_RETAIN_S = 300.0
DEFAULT_MAX_EVENTS = 4096
DEFAULT_MAX_IMPORTS = 1024


class EventRuntime(Protocol):
    """Interprocess events on one device (real: :class:`TorchEventRuntime`)."""

    def import_event(self, device: int, handle: bytes) -> Any:
        """The worker's event, with ``wait(stream)``."""
        ...

    def new_event(self, device: int) -> Any:
        """A fresh interprocess event: ``record(stream)``, ``ipc_handle()``, ``query()``,
        ``synchronize()``."""
        ...


class TorchEventRuntime:
    """``torch.cuda.Event`` with ``interprocess=True`` (torch loaded on construction)."""

    def __init__(self, torch: Any | None = None) -> None:
        if torch is None:
            from kvhive.transfer.cuda.runtime import load_torch_cuda

            torch = load_torch_cuda()
        self.torch = torch

    def import_event(self, device: int, handle: bytes) -> Any:
        return self.torch.cuda.Event.from_ipc_handle(device, handle)

    def new_event(self, device: int) -> Any:
        with self.torch.cuda.device(device):
            return self.torch.cuda.Event(interprocess=True)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event the server recorded after its copy, exported for the worker.  ``handle``
    is what the reply carries; :class:`DeviceEvents` keeps the event alive (see the
    module's lifetime contract)."""

    handle: bytes
    event: Any
    recorded_at: float

    def synchronize(self) -> None:
        """Block the calling thread until the recorded work has run."""
        self.event.synchronize()

    def query(self) -> bool:
        """Whether the recorded work has run."""
        return bool(self.event.query())


class DeviceEvents:
    """The worker's events in, the server's events out, for one device.

    Thread safety: any thread may call any method; ``_lock`` guards the two retention
    deques (never held across a device call other than ``query``, except the forced
    ``synchronize`` at the bound)."""

    def __init__(
        self,
        device: int,
        *,
        runtime: EventRuntime | None = None,
        retain_s: float = DEFAULT_RETAIN_S,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_imports: int = DEFAULT_MAX_IMPORTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_events < 1 or max_imports < 1 or retain_s < 0:
            raise ValueError("max_events and max_imports must be >= 1, retain_s >= 0")
        self.device = device
        self._rt = runtime if runtime is not None else TorchEventRuntime()
        self._retain_s = retain_s
        self._max_events = max_events
        self._clock = clock
        self._lock = threading.Lock()
        self._exported: deque[RecordedEvent] = deque()
        self._imported: deque[Any] = deque(maxlen=max_imports)
        self.early_releases = 0
        """Exported events released before ``retain_s`` because of ``max_events``."""

    def wait_for_worker(self, handle: bytes, stream: Any) -> None:
        """Make ``stream`` wait for the worker's event ``handle`` (a request's ``event``
        bytes); nothing for an empty or stub handle.  BadRequest for any other shape."""
        handle = bytes(handle)
        if handle in NO_EVENT_HANDLES:
            return
        if len(handle) == EVENT_HANDLE_BYTES:
            event = self._rt.import_event(self.device, handle)
            event.wait(stream)
            with self._lock:
                self._imported.append(event)
            return
        if len(handle) == TIMELINE_HANDLE_BYTES and handle[0] == 1:
            raise BadRequest(
                "the event handle is a timeline-semaphore handle (the worker runs with "
                "isolated_ipc); this server does not support isolated_ipc event handles: "
                "turn isolated_ipc off for lmcache-driven CUDA transfers"
            )
        raise BadRequest(
            f"event handle of {len(handle)} bytes: expected none, b'stub_ipc_handle' or a "
            f"{EVENT_HANDLE_BYTES}-byte CUDA IPC event handle"
        )

    def record(self, stream: Any) -> RecordedEvent:
        """Record a fresh interprocess event on ``stream`` and export it; the event is
        retained (module docstring), so its handle may go into a reply."""
        event = self._rt.new_event(self.device)
        event.record(stream)
        handle = bytes(event.ipc_handle())
        if len(handle) != EVENT_HANDLE_BYTES:
            raise RuntimeError(f"exported event handle has {len(handle)} bytes")
        rec = RecordedEvent(handle, event, self._clock())
        with self._lock:
            self._exported.append(rec)
            self._prune_locked(rec.recorded_at)
        return rec

    def retained(self) -> int:
        """Exported events currently kept alive."""
        with self._lock:
            return len(self._exported)

    def prune(self) -> None:
        """Release the exported events the contract no longer requires."""
        with self._lock:
            self._prune_locked(self._clock())

    def _prune_locked(self, now: float) -> None:
        q = self._exported
        while q and now - q[0].recorded_at >= self._retain_s and q[0].query():
            q.popleft()
        while len(q) > self._max_events:
            done = next((r for r in q if r.query()), None)
            if done is None:
                done = q[0]
                done.synchronize()
            q.remove(done)
            self.early_releases += 1
            if self.early_releases in (1, 10, 100) or self.early_releases % 1000 == 0:
                log.warning(
                    "released %d exported CUDA events before %.0f s to stay within %d; a "
                    "worker that imports a reply's event that late gets an invalid event",
                    self.early_releases,
                    self._retain_s,
                    self._max_events,
                )
