"""L2 (STORAGE) KV events: the presence events an L2 tier publishes (``storage/l2/presence.py``)
and the log's STORAGE records from them (``--kv-events-l2``), on a real bus drained by hand."""

from __future__ import annotations

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import EventBus
from kvhive.observability.events import EventType
from kvhive.observability.kv_events import MEDIUM_STORAGE, KVEventLog
from kvhive.storage.l2.presence import PresenceEvents
from kvhive.wire import types as t

C = 4


def k(i: int, model: str = "m") -> ObjectKey:
    return ObjectKey(f"hash-{i:04d}".encode(), model, 0)


class Seen:
    """Collects the presence events the bus delivers."""

    name = "seen"

    def __init__(self) -> None:
        self.got: list[tuple[str, str, list[int]]] = []

    def subscriptions(self):  # type: ignore[no-untyped-def]
        return {EventType.L2_KEYS_PRESENT: self._add, EventType.L2_KEYS_GONE: self._add}

    def _add(self, e: ev.L2KeysPresent | ev.L2KeysGone) -> None:
        kind = "present" if isinstance(e, ev.L2KeysPresent) else "gone"
        self.got.append((kind, e.reason, [int(key.chunk_hash[5:]) for key in e.keys]))


def test_presence_is_silent_unless_someone_listens() -> None:
    bus = EventBus(max_queue_size=100, linger_s=0)
    p = PresenceEvents(bus, 0, "fs")
    p.stored([k(1)])
    p.looked_up([k(2)], [True], lambda _: False, [])
    assert bus.queue_depth == 0 and p.discovered == 0


def test_discovered_once_then_vanished() -> None:
    bus = EventBus(max_queue_size=100, linger_s=0)
    seen = Seen()
    bus.register(seen)
    p = PresenceEvents(bus, 1, "shared")
    mine = {k(0)}
    p.stored([k(0)])
    # k(0) is this node's; k(1), k(2) another node's: discovered once
    p.looked_up([k(0), k(1), k(2)], [True, True, True], mine.__contains__, [])
    p.looked_up([k(1), k(2)], [True, True], mine.__contains__, [])
    # k(1) gone at the next lookup; k(0) (tracked) found gone too
    p.looked_up([k(0), k(1), k(2)], [False, False, True], mine.__contains__, [k(0)])
    p.missed([k(2)], [])  # a load found k(2) missing
    p.gone([k(5)], "evicted")
    bus.drain()
    assert seen.got == [
        ("present", "stored", [0]),
        ("present", "discovered", [1, 2]),
        ("gone", "vanished", [0, 1]),
        ("gone", "vanished", [2]),
        ("gone", "evicted", [5]),
    ]
    assert p.discovered == 2


def test_discovered_set_is_bounded() -> None:
    bus = EventBus(max_queue_size=100, linger_s=0)
    seen = Seen()
    bus.register(seen)
    p = PresenceEvents(bus, 0, "fs", kept=2)
    p.looked_up([k(1), k(2), k(3)], [True] * 3, lambda _: False, [])
    p.looked_up([k(1)], [True], lambda _: False, [])  # forgotten (oldest): reported again
    bus.drain()
    assert [g[2] for g in seen.got] == [[1, 2, 3], [1]]


def _feed(l2: bool) -> tuple[EventBus, KVEventLog]:
    bus = EventBus(max_queue_size=100, linger_s=0)
    log = KVEventLog(bus, 16, l2=l2)
    bus.publish(
        ev.TokenBindings(chunk_hashes=[k(0).chunk_hash, k(1).chunk_hash], parent_hash=None,
                         tokens=list(range(2 * C)), first_token=0, chunk_size=C)
    )  # fmt: skip
    bus.publish(ev.L2KeysPresent(keys=[k(0), k(1)], l2_name="fs", adapter_index=0,
                                 reason="discovered"))  # fmt: skip
    bus.publish(ev.L2KeysGone(keys=[k(0)], l2_name="fs", adapter_index=0, reason="evicted"))
    bus.publish(ev.L1WriteFinished(keys=[k(1)]))
    bus.drain()
    return bus, log


def test_the_log_records_storage_only_with_the_flag() -> None:
    _, log = _feed(l2=True)
    assert log.status()["l2"] is True
    recs = log.read_all(0, 100).records
    assert [(r.kind, r.medium, r.hashes, r.parent) for r in recs] == [
        (t.KV_EVENT_KIND_STORED, MEDIUM_STORAGE, (k(0).chunk_hash,), None),
        (t.KV_EVENT_KIND_STORED, MEDIUM_STORAGE, (k(1).chunk_hash,), k(0).chunk_hash),
        (t.KV_EVENT_KIND_REMOVED, MEDIUM_STORAGE, (k(0).chunk_hash,), None),
        (t.KV_EVENT_KIND_STORED, t.KV_EVENT_MEDIUM_CPU, (k(1).chunk_hash,), k(0).chunk_hash),
    ]
    # lmcache clients read the same log (and skip medium != CPU themselves)
    page = log.read("m", 0, 100).decode()
    assert [(r.kind, r.medium) for r in page.events][-1] == ("stored", "CPU")
    _, off = _feed(l2=False)
    assert [r.medium for r in off.read_all(0, 100).records] == [t.KV_EVENT_MEDIUM_CPU]


def test_read_all_reports_losses_before_the_records_after_them() -> None:
    bus = EventBus(max_queue_size=100, linger_s=0)
    log = KVEventLog(bus, 4)
    for i in range(3):
        bus.publish(ev.L1KeysEvicted(keys=[k(i)]))
    bus.drain()
    page = log.read_all(0, 100)
    assert (len(page.records), page.next_cursor, page.lost) == (3, 3, False)
    for i in range(3):
        bus.publish(ev.L1KeysEvicted(keys=[k(i)]))
    bus.drain()
    page = log.read_all(1, 100)  # the ring of 4 kept 3..6: 2 is gone
    assert (len(page.records), page.next_cursor, page.lost) == (4, 6, True)
    assert log.read_all(6, 100) == type(page)([], 6, False)
