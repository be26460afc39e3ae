"""CompletionThread: tickets finish only after their event completed, in order, once.

No GPU here: the recorded device event is :class:`MockCudaEvent`, a stand-in (named as a
mock: no GPU here) whose ``synchronize`` blocks until the test completes it, or raises the
error a failed CUDA copy would surface there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kvhive.errors import RegistrationError, TransferFailed
from kvhive.transfer.backend import PendingTicket
from kvhive.transfer.completion import CompletionThread

WAIT = 5.0


class MockCudaEvent:
    """Stand-in for a recorded ``torch.cuda.Event`` (named as a mock: no GPU here)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self._fired = threading.Event()
        self._error = error
        self.waited = threading.Event()

    def complete(self) -> None:
        self._fired.set()

    def synchronize(self) -> None:
        self.waited.set()
        if not self._fired.wait(WAIT):
            raise AssertionError("the test never completed this event")
        if self._error is not None:
            raise self._error

    def query(self) -> bool:
        return self._fired.is_set()


@pytest.fixture
def done() -> Iterator[CompletionThread]:
    thread = CompletionThread("test-copy-done")
    yield thread
    thread.close()
    assert thread.join(WAIT)


def test_ticket_finishes_only_after_its_event(done: CompletionThread) -> None:
    event, ticket = MockCudaEvent(), PendingTicket(b"h" * 64)
    seen: list[BaseException | None] = []
    ticket.add_done_callback(seen.append)
    done.submit(event, ticket)
    assert event.waited.wait(WAIT)
    with pytest.raises(TimeoutError):
        ticket.wait(0.05)
    assert seen == []
    event.complete()
    ticket.wait(WAIT)
    assert seen == [None]
    assert ticket.handle == b"h" * 64
    late: list[BaseException | None] = []
    ticket.add_done_callback(late.append)  # after finish: at once, on this thread
    assert late == [None] and seen == [None]


def test_device_error_reaches_callbacks_as_transfer_failed(done: CompletionThread) -> None:
    cause = RuntimeError("CUDA error: an illegal memory access was encountered")
    event, ticket = MockCudaEvent(cause), PendingTicket(b"x")
    seen: list[BaseException | None] = []
    ticket.add_done_callback(seen.append)
    done.submit(event, ticket)
    event.complete()
    with pytest.raises(TransferFailed, match="illegal memory access") as info:
        ticket.wait(WAIT)
    assert info.value.__cause__ is cause
    assert len(seen) == 1 and seen[0] is info.value


def test_settled_hook_runs_before_callbacks_and_each_once(done: CompletionThread) -> None:
    order: list[str] = []
    event, ticket = MockCudaEvent(), PendingTicket()
    ticket.add_done_callback(lambda e: order.append("callback"))
    ticket.add_done_callback(lambda e: order.append("callback2"))
    done.submit(event, ticket, lambda: order.append("settled"))
    event.complete()
    ticket.wait(WAIT)
    ticket.finish(None)  # a second finish is ignored
    assert order == ["settled", "callback", "callback2"]


def test_tickets_finish_in_submission_order(done: CompletionThread) -> None:
    events = [MockCudaEvent() for _ in range(3)]
    tickets = [PendingTicket() for _ in events]
    order: list[int] = []
    for i, (ev, t) in enumerate(zip(events, tickets, strict=True)):
        t.add_done_callback(lambda e, i=i: order.append(i))
        done.submit(ev, t)
    events[2].complete()
    events[1].complete()
    with pytest.raises(TimeoutError):
        tickets[2].wait(0.05)  # waits behind event 0
    events[0].complete()
    for t in tickets:
        t.wait(WAIT)
    assert order == [0, 1, 2]


def test_a_failing_callback_does_not_stop_the_thread(
    done: CompletionThread, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = PendingTicket(), PendingTicket()

    def boom(_: BaseException | None) -> None:
        raise ValueError("callback bug")

    first.add_done_callback(boom)
    ev1, ev2 = MockCudaEvent(), MockCudaEvent()
    done.submit(ev1, first)
    done.submit(ev2, second)
    ev1.complete()
    ev2.complete()
    second.wait(WAIT)
    first.wait(0)
    assert "done callback failed" in caplog.text


def test_close_finishes_what_was_submitted_then_refuses() -> None:
    thread = CompletionThread()
    event, ticket = MockCudaEvent(), PendingTicket()
    thread.submit(event, ticket)
    thread.close()
    thread.close()  # idempotent
    assert thread.closed
    with pytest.raises(RegistrationError, match="closed"):
        thread.submit(MockCudaEvent(), PendingTicket())
    assert not thread.join(0.05)  # still waiting on the event
    event.complete()
    assert thread.join(WAIT)
    ticket.wait(0)
