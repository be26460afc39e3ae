"""The KV-event log: records from bus events, the reference's cursor/loss/incarnation
semantics, replay size, token bindings, subscriptions and their encoding."""

from __future__ import annotations

import msgspec
import pytest

from kvhive.errors import BadRequest
from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.observability.kv_events import KVEventLog
from kvhive.wire import types as t

C = 4  # chunk size (tokens)
RANK0, RANK1 = 0x02000200, 0x02010201  # world 2, ranks 0 and 1


def h(i: int) -> bytes:
    return f"hash-{i:04d}".encode()


class Feed:
    """A real bus (not started: drained by hand) feeding one log."""

    def __init__(self, capacity: int = 8, *, queue: int = 10_000, **kw) -> None:
        self.bus = EventBus(max_queue_size=queue, linger_s=0)
        self.log = KVEventLog(self.bus, capacity, **kw)

    def bind(self, first_chunk: int, n: int, parent: bytes | None = None) -> list[int]:
        tokens = list(range(1000, 1000 + (first_chunk + n) * C))
        self.bus.publish(
            ev.TokenBindings(
                chunk_hashes=[h(first_chunk + i) for i in range(n)],
                parent_hash=parent,
                tokens=tokens,
                first_token=first_chunk * C,
                chunk_size=C,
            )
        )
        return tokens

    def commit(self, *idx: int, model: str = "m", rank: int = RANK0) -> None:
        self.bus.publish(ev.L1WriteFinished(keys=[ObjectKey(h(i), model, rank) for i in idx]))

    def evict(self, *idx: int, model: str = "m", reason: str = "evicted") -> None:
        keys = [ObjectKey(h(i), model, r) for i in idx for r in (RANK0, RANK1)]
        self.bus.publish(ev.L1KeysEvicted(keys=keys, reason=reason))

    def drain(self) -> None:
        self.bus.drain()

    def read(self, cursor: int = 0, max_events: int = 1024, model: str = "m") -> t.KVEventBatch:
        return self.log.read(model, cursor, max_events).decode()


def stored(n_chunks: int = 3) -> Feed:
    f = Feed()
    f.bind(0, n_chunks)
    f.commit(*range(n_chunks))
    f.drain()
    return f


def test_stored_records_carry_hash_parent_tokens():
    f = Feed()
    tokens = f.bind(0, 3)
    f.commit(0, 1, 2)
    f.drain()
    b = f.read()
    assert b.enabled and not b.lost and b.next_cursor == 3
    assert [(r.seq, r.kind, r.medium, r.model_name) for r in b.events] == [
        (1, "stored", "CPU", "m"),
        (2, "stored", "CPU", "m"),
        (3, "stored", "CPU", "m"),
    ]
    assert [r.block_hashes for r in b.events] == [[h(0)], [h(1)], [h(2)]]
    assert [r.parent_block_hash for r in b.events] == [None, h(0), h(1)]
    assert [r.token_ids for r in b.events] == [tokens[i * C : (i + 1) * C] for i in range(3)]


def test_a_later_store_step_chains_to_its_given_parent():
    f = Feed()
    f.bind(2, 2, parent=h(1))
    f.commit(2, 3)
    f.drain()
    assert [r.parent_block_hash for r in f.read().events] == [h(1), h(2)]


def test_commit_without_binding_is_only_counted():
    f = Feed()
    f.commit(5, 6)
    f.drain()
    assert f.read().events == []
    assert f.log.status()["unbound_stores"] == 2


def test_ranks_of_one_event_give_one_record_per_hash_and_model():
    f = Feed()
    f.bind(0, 1)
    f.bus.publish(
        ev.L1WriteFinished(
            keys=[ObjectKey(h(0), "m", RANK0), ObjectKey(h(0), "m", RANK1), ObjectKey(h(0), "x", 0)]
        )
    )
    f.drain()
    assert [r.block_hashes for r in f.read().events] == [[h(0)]]
    assert [r.model_name for r in f.read(model="x").events] == ["x"]


def test_removals_one_record_per_event_and_model_deletes_and_clears_too():
    f = stored(3)
    f.evict(0, 1)
    f.evict(2, reason="deleted")
    f.evict(9, model="other")
    f.drain()
    removed = [r for r in f.read().events if r.kind == "removed"]
    assert [(r.seq, r.block_hashes, r.parent_block_hash, r.token_ids) for r in removed] == [
        (4, [h(0), h(1)], None, []),
        (5, [h(2)], None, []),
    ]
    assert [r.block_hashes for r in f.read(model="other").events] == [[h(9)]]


def test_cursor_pages_and_other_models_are_passed_over():
    f = stored(3)
    f.evict(7, model="other")  # seq 4
    f.drain()
    b = f.read(0, 2)
    assert [r.seq for r in b.events] == [1, 2] and b.next_cursor == 2
    b = f.read(2, 2)
    # Seq 4 belongs to another model: examined, so the cursor moves past it.
    assert [r.seq for r in b.events] == [3] and b.next_cursor == 4
    b = f.read(4, 2)
    assert b.events == [] and b.next_cursor == 4 and not b.lost


def test_fresh_log_cursor_zero_is_not_lost():
    b = Feed().read(0)
    assert b.enabled and not b.lost and b.next_cursor == 0 and b.events == []


def test_replay_keeps_capacity_records_and_an_older_cursor_is_lost():
    f = Feed(capacity=8)
    f.bind(0, 12)
    f.commit(*range(12))  # seqs 1..12; 5..12 retained
    f.drain()
    assert f.log.status()["log_depth"] == 8
    b = f.read(0)
    assert b.lost and [r.seq for r in b.events] == list(range(5, 13)) and b.next_cursor == 12
    b = f.read(3)  # seq 4 is gone: lost
    assert b.lost
    b = f.read(4)  # exactly the window: nothing missed
    assert not b.lost and [r.seq for r in b.events] == list(range(5, 13))


def test_a_cursor_past_the_end_is_lost_and_resets_to_the_last_seq():
    """A cursor from another incarnation (a restarted server's log is shorter)."""
    f = stored(3)
    b = f.read(50)
    assert b.lost and b.events == [] and b.next_cursor == 3


def test_incarnation_is_the_start_time_and_differs_per_log():
    a, b = Feed(), Feed()
    assert a.read().incarnation == a.log.incarnation != b.log.incarnation
    assert a.log.incarnation > 1_600_000_000 * 10**9  # ns since the epoch


def test_bus_drops_mark_a_loss_and_discard_what_came_before():
    f = Feed(capacity=64, queue=4)
    f.bind(0, 8)
    f.commit(0)
    f.commit(1)
    f.commit(2)  # the queue is full now
    f.commit(3)  # dropped
    f.drain()  # seqs 1..3, then the drop is reported: a loss marker (seq 4)
    f.commit(3)
    f.drain()  # seq 5
    b = f.read(0)
    assert b.lost and [r.seq for r in b.events] == [5] and b.next_cursor == 5
    assert f.log.status()["lost_markers"] == 1
    b = f.read(4)  # past the marker: no loss
    assert not b.lost and [r.seq for r in b.events] == [5]
    b = f.read(0, 2)  # a page that ends before the marker: no loss seen yet
    assert not b.lost and [r.seq for r in b.events] == [1, 2] and b.next_cursor == 2


def test_binding_cache_is_halved_when_full():
    f = Feed(binding_cache_size=8)
    f.bind(0, 9)
    f.drain()
    assert f.log.status()["token_bindings"] == 4
    f.commit(0, 8)  # 0 was dropped (the oldest), 8 kept
    f.drain()
    assert [r.block_hashes for r in f.read().events] == [[h(8)]]
    assert f.log.status()["unbound_stores"] == 1


def test_disabled_log_answers_enabled_false():
    for log in (KVEventLog(DISABLED, 100), KVEventLog(EventBus(max_queue_size=8), 0)):
        assert not log.enabled
        page = log.read("m", 0, 10).decode()
        assert not page.enabled and page.events == [] and page.next_cursor == 0


def test_encoding_is_the_plain_struct_encoding():
    """Pre-encoded records: the same bytes as encoding the decoded batch field by field."""
    f = stored(2)
    f.evict(0)
    f.drain()
    page = f.log.read("m", 0, 100)
    raw = page.encode()
    decoded = msgspec.msgpack.decode(raw, type=t.KVEventBatch)
    assert msgspec.msgpack.encode(decoded) == raw
    as_maps = msgspec.msgpack.decode(raw)
    assert list(as_maps) == ["enabled", "incarnation", "next_cursor", "lost", "events"]
    assert list(as_maps["events"][0]) == [
        "seq",
        "kind",
        "medium",
        "model_name",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
    ]


# ---- subscriptions ----------------------------------------------------------------------------


def poll(sub) -> t.KVEventBatch | None:
    raw = sub.poll()
    if raw is None:
        return None
    sub.sent()
    return msgspec.msgpack.decode(raw, type=t.KVEventBatch)


def test_subscription_first_batch_at_once_then_only_on_records():
    f = stored(2)
    wakes = []
    sub = f.log.subscribe(1, "m", 0, 1024)
    sub.attach(lambda: wakes.append(1))
    first = poll(sub)
    assert first is not None and [r.seq for r in first.events] == [1, 2]
    assert poll(sub) is None  # nothing new: no batch
    f.evict(9, model="other")
    f.drain()
    assert wakes and poll(sub) is None  # another model's record moves the cursor only
    assert sub.cursor == 3
    f.evict(0)
    f.drain()
    b = poll(sub)
    assert b is not None and [r.seq for r in b.events] == [4] and b.next_cursor == 4


def test_subscription_first_batch_even_when_empty():
    sub = Feed().log.subscribe(1, "m", 0, 10)
    b = poll(sub)
    assert b is not None and b.enabled and b.events == [] and not b.lost


def test_an_unsent_batch_is_read_again_with_what_arrived_since():
    f = stored(1)
    sub = f.log.subscribe(1, "m", 0, 1024)
    assert sub.poll() is not None  # not sent (peer full)
    f.evict(0)
    f.drain()
    b = poll(sub)
    assert b is not None and [r.seq for r in b.events] == [1, 2]


def test_one_subscription_per_instance():
    f = Feed()
    old = f.log.subscribe(7, "m", 0, 10)
    other = f.log.subscribe(8, "m", 0, 10)
    new = f.log.subscribe(7, "m", 0, 10)
    assert old.closed and not new.closed and not other.closed
    old.close()  # the old stream's end does not drop the new subscription
    assert f.log.status()["subscribers"] == 2
    f.log.close_instance(7)
    assert new.closed
    new.close()
    assert f.log.status()["subscribers"] == 1


@pytest.mark.parametrize(("cursor", "max_events"), [(-1, 10), (0, 0), (0, -3), (0, 1025)])
def test_subscription_arguments_are_validated(cursor, max_events):
    with pytest.raises(BadRequest):
        Feed().log.subscribe(1, "m", cursor, max_events)


def test_max_events_bounds_are_inclusive():
    log = Feed().log
    log.subscribe(1, "m", 0, 1)
    log.subscribe(2, "m", 0, 1024)


def test_disabled_subscription_sends_its_status_then_ends():
    sub = KVEventLog(DISABLED, 100).subscribe(1, "m", 0, 10)
    b = poll(sub)
    assert b is not None and not b.enabled
    assert not sub.closed  # ends only once the status batch was acknowledged (next poll)
    assert sub.poll() is None and sub.closed


def test_shutdown_closes_subscriptions():
    f = Feed()
    sub = f.log.subscribe(1, "m", 0, 10)
    f.bus.stop()
    assert sub.closed
