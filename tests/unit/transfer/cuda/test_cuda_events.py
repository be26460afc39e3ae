"""kvhive.transfer.cuda.events: the worker's event handle in (validated, imported, waited
on), the server's event out (recorded, exported, retained under the lifetime contract).

On CPU the events are :class:`MockEventRuntime`'s (named as a mock: no GPU here), with a
fake clock; the GPU test orders real copies against a spawned child's events both ways.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvhive.errors import BadRequest
from kvhive.transfer.cuda.events import (
    EVENT_HANDLE_BYTES,
    DeviceEvents,
    RecordedEvent,
)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class MockStream:
    """Named as a mock: a stream that logs what is enqueued on it."""

    def __init__(self) -> None:
        self.log: list[tuple[str, bytes]] = []


class MockEvent:
    """Named as a mock: an interprocess event whose completion the test decides."""

    def __init__(self, handle: bytes) -> None:
        self.handle = handle
        self.done = False
        self.syncs = 0

    def record(self, stream: MockStream) -> None:
        stream.log.append(("record", self.handle))

    def wait(self, stream: MockStream) -> None:
        stream.log.append(("wait", self.handle))

    def ipc_handle(self) -> bytes:
        return self.handle

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.syncs += 1
        self.done = True


class MockEventRuntime:
    """Named as a mock: no GPU here.  Counts imports and makes numbered events."""

    def __init__(self) -> None:
        self.imports: list[tuple[int, bytes]] = []
        self.made: list[MockEvent] = []

    def import_event(self, device: int, handle: bytes) -> MockEvent:
        self.imports.append((device, handle))
        return MockEvent(handle)

    def new_event(self, device: int) -> MockEvent:
        ev = MockEvent(len(self.made).to_bytes(4, "big") * 16)
        self.made.append(ev)
        return ev


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rt() -> MockEventRuntime:
    return MockEventRuntime()


def test_no_handle_and_stub_handle_wait_for_nothing(rt: MockEventRuntime) -> None:
    ev, s = DeviceEvents(3, runtime=rt), MockStream()
    ev.wait_for_worker(b"", s)
    ev.wait_for_worker(b"stub_ipc_handle", s)
    ev.wait_for_worker(memoryview(b"stub_ipc_handle"), s)  # type: ignore[arg-type]
    assert rt.imports == [] and s.log == []


def test_a_64_byte_handle_is_imported_on_the_device_and_waited_on(rt: MockEventRuntime) -> None:
    ev, s = DeviceEvents(3, runtime=rt), MockStream()
    h = bytes(range(64))
    ev.wait_for_worker(h, s)
    assert rt.imports == [(3, h)] and s.log == [("wait", h)]


@pytest.mark.parametrize(
    ("handle", "match"),
    [
        (b"\x01" + bytes(80), "isolated_ipc"),  # a timeline-semaphore handle
        (b"\x02" + bytes(80), "81 bytes"),  # 81 bytes, but no known version
        (bytes(63), "63 bytes"),
        (bytes(65), "65 bytes"),
        (b"stub", "4 bytes"),
    ],
)
def test_other_handles_are_bad_requests(rt: MockEventRuntime, handle: bytes, match: str) -> None:
    ev, s = DeviceEvents(0, runtime=rt), MockStream()
    with pytest.raises(BadRequest, match=match) as e:
        ev.wait_for_worker(handle, s)
    assert e.value.code == "bad_request" and rt.imports == [] and s.log == []
    if match != "isolated_ipc":
        assert "64-byte CUDA IPC event handle" in str(e.value)


def test_record_exports_a_fresh_event_per_call(rt: MockEventRuntime) -> None:
    ev, s = DeviceEvents(0, runtime=rt), MockStream()
    a, b = ev.record(s), ev.record(s)
    assert isinstance(a, RecordedEvent) and len(a.handle) == EVENT_HANDLE_BYTES
    assert a.handle != b.handle and s.log == [("record", a.handle), ("record", b.handle)]
    assert not a.query()
    a.synchronize()
    assert a.query() and rt.made[0].syncs == 1 and ev.retained() == 2


def test_events_are_kept_until_completed_and_old_enough(rt: MockEventRuntime) -> None:
    clock, s = Clock(), MockStream()
    ev = DeviceEvents(0, runtime=rt, retain_s=60, clock=clock)
    first = ev.record(s)
    clock.now += 10
    second = ev.record(s)
    for e in rt.made:
        e.done = True
    clock.now += 49  # first is 59 s old: completed but young, kept
    ev.prune()
    assert ev.retained() == 2
    clock.now += 1  # first is 60 s old: released; second (50 s) kept
    ev.prune()
    assert ev.retained() == 1
    rt.made[1].done = False  # an old event still running is kept however old
    clock.now += 3600
    ev.prune()
    assert ev.retained() == 1
    rt.made[1].done = True
    ev.prune()
    assert ev.retained() == 0 and ev.early_releases == 0
    assert first.query() and second.query()


def test_the_bound_releases_completed_events_first_and_never_a_running_one(
    rt: MockEventRuntime,
) -> None:
    clock, s = Clock(), MockStream()
    ev = DeviceEvents(0, runtime=rt, retain_s=300, max_events=2, clock=clock)
    ev.record(s)
    ev.record(s)
    rt.made[1].done = True  # the younger one has completed
    ev.record(s)  # over the bound: the completed one goes, the running oldest stays
    assert ev.retained() == 2 and ev.early_releases == 1
    assert rt.made[0].syncs == 0
    ev.record(s)  # over again, none completed: the oldest is waited for, then released
    assert ev.retained() == 2 and ev.early_releases == 2
    assert rt.made[0].syncs == 1 and rt.made[2].syncs == 0


def test_imports_are_kept_for_a_bounded_count(rt: MockEventRuntime) -> None:
    ev, s = DeviceEvents(0, runtime=rt, max_imports=2), MockStream()
    for i in range(5):
        ev.wait_for_worker(bytes([i]) * 64, s)
    assert len(ev._imported) == 2 and [e.handle[0] for e in ev._imported] == [3, 4]


def test_bad_parameters() -> None:
    for kw in ({"max_events": 0}, {"max_imports": 0}, {"retain_s": -1}):
        with pytest.raises(ValueError):
            DeviceEvents(0, runtime=MockEventRuntime(), **kw)  # type: ignore[arg-type]


# ---- a real GPU -------------------------------------------------------------------------------


def gpu_worker(queue: Any, to_child: Any, done: Any) -> None:
    """Spawned child: a worker whose write is still running when its event is sent, and
    which orders its own read after the server's event."""
    x = torch.zeros(1 << 20, dtype=torch.int32, device="cuda:0")
    torch.cuda.synchronize()
    s = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time before the write
    x.fill_(7)
    mine = torch.cuda.Event(interprocess=True)
    mine.record(s)
    queue.put((x, bytes(mine.ipc_handle())))
    server_handle = to_child.get(timeout=120)
    theirs = torch.cuda.Event.from_ipc_handle(0, server_handle)
    theirs.wait(s)  # the server's fill_(3) runs before our read
    ok = bool((x == 3).all().item())
    queue.put(ok)
    assert done.wait(120)


@needs_gpu
def test_gpu_events_order_copies_both_ways() -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, to_child, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    child = ctx.Process(target=gpu_worker, args=(queue, to_child, done))
    child.start()
    try:
        x, handle = queue.get(timeout=120)
        events = DeviceEvents(0)
        stream = torch.cuda.Stream(0)
        events.wait_for_worker(handle, stream)
        with torch.cuda.stream(stream):
            seen = x.clone()  # runs only after the worker's fill_(7)
            x.fill_(3)
        rec = events.record(stream)
        assert len(rec.handle) == 64 and events.retained() == 1
        to_child.put(rec.handle)
        rec.synchronize()
        assert rec.query() and bool((seen == 7).all().item())
        assert queue.get(timeout=120) is True
        del x, seen
        done.set()
        child.join(60)
        assert child.exitcode == 0
    finally:
        done.set()
        if child.is_alive():
            child.kill()
