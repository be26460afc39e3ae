"""Finishing copy tickets when the device work behind them completes.

A device backend enqueues a batch of copies on its stream, records an event after them and
hands the caller a :class:`~kvhive.transfer.backend.PendingTicket` at once.  A
:class:`CompletionThread` (one per backend) owns the other end: it waits on each recorded
event in submission order (``waitable.synchronize()``; events of one stream complete in
that order anyway) and then finishes the ticket, which runs the caller's done callbacks
(the L1 commit or release) on this thread.

Anything with ``synchronize()`` is a waitable (a ``torch.cuda.Event``, or a stand-in in
the tests), so the ordering and error rules here are tested without a GPU.

Per submitted ticket, in this order:

1. ``waitable.synchronize()``; an exception becomes ``TransferFailed`` (its cause kept);
2. ``on_settled()`` -- the backend's note that the device no longer touches the buffers
   (its ``close`` waits for this, never for callbacks, so a callback that takes a lock the
   closer holds cannot deadlock it);
3. ``ticket.finish(error)`` -- done callbacks, each exactly once.  One that raises is
   logged and does not stop the thread (``PendingTicket.finish`` then skips that ticket's
   later callbacks: callbacks must not raise).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvhive.errors import RegistrationError, TransferFailed
from kvhive.transfer.backend import PendingTicket

log = logging.getLogger(__name__)


class Waitable(Protocol):
    """What the completion thread waits on: a recorded device event."""

    def synchronize(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Pending:
    """One submitted batch: what to wait on, the ticket to finish, the backend's note."""

    waitable: Waitable
    ticket: PendingTicket
    on_settled: Callable[[], None] | None


_STOP = None  # queue sentinel


class CompletionThread:
    """One daemon thread finishing tickets in submission order (see the module doc).

    ``submit`` may be called from any thread.  ``close`` stops accepting work; the thread
    still settles everything submitted before, then exits.  ``close`` does not wait for
    that (call :meth:`join`), so it is safe to call from a done callback.
    """

    def __init__(self, name: str = "kvhive-copy-done") -> None:
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self,
        waitable: Waitable,
        ticket: PendingTicket,
        on_settled: Callable[[], None] | None = None,
    ) -> None:
        """Finish ``ticket`` once ``waitable`` completed (``on_settled`` runs first)."""
        with self._lock:
            if self._closed:
                raise RegistrationError("the completion thread is closed")
            self._queue.put(_Pending(waitable, ticket, on_settled))

    def close(self) -> None:
        """Accept no more work; pending tickets are still finished.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to exit (after :meth:`close`); True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            _settle(item)


def _settle(item: _Pending) -> None:
    error: BaseException | None = None
    try:
        item.waitable.synchronize()
    except Exception as exc:  # noqa: BLE001 - any device failure fails this copy only
        error = TransferFailed(f"device copy failed: {exc}")
        error.__cause__ = exc
    if item.on_settled is not None:
        try:
            item.on_settled()
        except Exception:  # bookkeeping must not keep the ticket open
            log.exception("settling a copy failed")
    try:
        item.ticket.finish(error)
    except Exception:  # a failing callback must not stop later tickets
        log.exception("a copy's done callback failed")
