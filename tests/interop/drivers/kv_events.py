"""KV events through the real lmcache 0.5.6 vLLM worker adapter (``enable_kv_events=True``).

Runs in the client venv against a server started with a small ``--l1-size-gb``.  The worker
adapter finds ``kv_event_stream`` in ``get_experimental``, subscribes (``subscribe_kv_events``
through its MQ client's stream API, in its own receiver thread started by
``get_kv_events()``, as vLLM's scheduler step does) and turns the server's records into the
``CacheStoreEvent``/``CacheRemoveEvent``s vLLM would publish.  The driver:

1. stores one request of ``--chunks`` chunks in two steps (the second step's first parent
   comes from the server's session) and collects the "stored" events;
2. stores ``--evict-requests`` more requests, more than L1 holds, and collects the "removed"
   events of what was evicted;
3. on a raw DEALER (another instance id), subscribes with the client's own encoders and
   checks that the batches decode with the reference's ``KVEventBatch`` and re-encode to the
   same bytes, that the next batch waits for the ack (the cache is cleared meanwhile), that a
   second subscription of the same instance ends the first, that a cancel is answered with
   the end frame and bad arguments with an error reply; then collects the adapter's
   "removed" events of the clear.

It reports what it saw; the pytest side asserts.
"""

from __future__ import annotations

import time

import _common as common
import msgspec
import zmq


def collect(h: common.VllmHarness, until, timeout: float = 15.0) -> list:
    """Drain the adapter's KV events (as vLLM's scheduler does each step) until
    ``until(events)`` or ``timeout``."""
    events: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events.extend(h.worker.get_kv_events())
        if until(events):
            break
        time.sleep(0.02)
    return events


def stored_of(events: list) -> list:
    return [e for e in events if type(e).__name__ == "CacheStoreEvent"]


def removed_hashes(events: list) -> list[bytes]:
    return [bh for e in events if type(e).__name__ == "CacheRemoveEvent" for bh in e.block_hashes]


def raw_checks(url: str, model: str, make_events) -> dict:
    """Subscribe on a raw DEALER with the client's encoders: byte-exact batches, one batch
    in flight until the ack (``make_events()`` adds records meanwhile), replacement, cancel
    and a bad request."""
    from lmcache.v1.multiprocess.custom_types import KVEventBatch
    from lmcache.v1.multiprocess.transport.zmq_impl.wire import encode_operation

    enc = msgspec.msgpack.encode
    op = encode_operation("subscribe_kv_events")
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(url)
    out: dict = {}

    def recv(timeout_ms: int = 5000) -> list[bytes] | None:
        return s.recv_multipart() if s.poll(timeout_ms) else None

    s.send_multipart([enc(100), op, enc(4242), enc(model), enc(0), enc(1024)])
    first = recv()
    out["first_frames"] = None if first is None else len(first)
    if first is not None and len(first) == 3:
        batch = msgspec.msgpack.decode(first[2], type=KVEventBatch)
        out["raw_events"] = len(batch.events)
        out["raw_kinds"] = sorted({e.kind for e in batch.events})
        out["raw_reencoded_equal"] = msgspec.msgpack.encode(batch) == first[2]
        out["raw_enabled"] = batch.enabled
    # Nothing more until an ack (one batch in flight at most), even when records arrive.
    make_events()
    out["second_without_ack"] = recv(500) is not None
    s.send_multipart([enc(100), b"", b"ack"])
    second = recv()
    if second is not None and len(second) == 3:
        batch = msgspec.msgpack.decode(second[2], type=KVEventBatch)
        out["after_ack_kinds"] = sorted({e.kind for e in batch.events})
        out["after_ack_reencoded_equal"] = msgspec.msgpack.encode(batch) == second[2]
    # Another subscription of instance 4242 ends this one: [uid, op] without payload.
    s.send_multipart([enc(101), op, enc(4242), enc(model), enc(0), enc(1024)])
    got = [recv(), recv()]
    out["replaced_end"] = any(m is not None and m[0] == enc(100) and len(m) == 2 for m in got)
    out["replacement_first"] = any(m is not None and m[0] == enc(101) and len(m) == 3 for m in got)
    # Cancel: the end frame comes back.
    s.send_multipart([enc(101), b"", b"cancel"])
    end = recv()
    out["cancel_end_frames"] = None if end is None else len(end)
    # Bad arguments: an error reply at once (the reference sends nothing).
    s.send_multipart([enc(102), op, enc(4242), enc(model), enc(0), enc(0)])
    err = recv(3000)
    out["bad_max_events_reply"] = None if err is None else msgspec.msgpack.decode(err[1])
    s.close()
    return out


def main() -> None:
    p = common.driver_parser("interop-kv-events")
    p.add_argument("--mode", choices=["lmcache_driven", "engine_driven"], default="lmcache_driven")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--evict-requests", type=int, default=12)
    p.add_argument("--evict-chunks", type=int, default=8)
    args = p.parse_args()

    shape = common.ModelShape()  # 1 MiB per 256-token chunk
    h = common.VllmHarness(
        args.url,
        args.model,
        args.block_size,
        args.mode,
        heartbeat_interval=2.0,
        enable_kv_events=True,
    )
    c, b = h.chunk_size, h.blocks_in_chunk
    n_max = max(args.chunks, args.evict_chunks)
    src, _ = common.src_dst_blocks(n_max, b)
    kv = common.register_cpu_kv(h, shape, src[-1] + 1)
    res: dict = {
        "capability": "kv_event_stream" in h.worker.experimental,
        "server_source": h.worker._kv_event_server_source,
    }
    hasher = h.worker._kv_event_hasher

    # Subscribe: the first drain starts the adapter's receiver; its first batch (the status)
    # sets the incarnation.
    h.worker.get_kv_events()
    deadline = time.monotonic() + 10
    while h.worker._kv_event_incarnation is None and time.monotonic() < deadline:
        time.sleep(0.02)
    res["subscribed"] = h.worker._kv_event_incarnation is not None

    # 1. One request, stored in two steps.
    n = args.chunks
    tk = common.tokens(777, n * c + 5)  # a trailing partial chunk is never stored
    want = [bytes(x) for x in hasher.compute_chunk_hashes(tk, end=n * c)]
    common.fill_blocks(kv, src, seed=777)
    half = n // 2
    ok1 = h.store("kv-a", tk, src[: half * b], 0, half * c)
    ok2 = h.store("kv-a", tk, src[half * b : n * b], half * c, n * c)
    h.end_session("kv-a")
    events = collect(h, lambda ev: len(stored_of(ev)) >= n)
    stored = stored_of(events)
    res["store_ok"] = [ok1, ok2]
    res["stored_hashes_equal"] = [e.block_hashes for e in stored] == [[x] for x in want]
    res["stored_parents_equal"] = [e.parent_block_hash for e in stored] == [None, *want[:-1]]
    res["stored_tokens_equal"] = [list(e.token_ids) for e in stored] == [
        tk[i * c : (i + 1) * c] for i in range(n)
    ]
    res["stored_block_size"] = sorted({e.block_size for e in stored})
    res["stored_medium"] = sorted({e.medium for e in stored})
    res["stored_count"] = len(stored)
    res["early_removed"] = len(removed_hashes(events))

    # 2. Fill L1 past its size: the oldest chunks are evicted.
    announced = set(want)
    removed: list[bytes] = []
    for i in range(args.evict_requests):
        rid = f"kv-ev-{i}"
        tki = common.tokens(9000 + i, args.evict_chunks * c)
        announced.update(bytes(x) for x in hasher.compute_chunk_hashes(tki))
        h.store(rid, tki, src[: args.evict_chunks * b], 0, args.evict_chunks * c)
        h.end_session(rid)
        events = collect(h, lambda ev: False, timeout=0.05)
        removed.extend(removed_hashes(events))
        res.setdefault("evict_stored", 0)
        res["evict_stored"] += len(stored_of(events))
    events = collect(h, lambda ev: False, timeout=1.0)
    removed.extend(removed_hashes(events))
    res["evict_stored"] += len(stored_of(events))
    res["evicted"] = len(removed)
    res["evicted_first_request"] = sorted(set(want) & set(removed)) == sorted(want)
    res["removed_unannounced"] = len(set(removed) - announced)

    with h.worker._kv_event_lock:  # what the adapter announced and has not withdrawn
        left = set(h.worker._announced_kv_hashes)
    res["announced_before_clear"] = len(left)

    # 3. Raw subscription checks (another instance id: the adapter's stream stays), during
    # which the cache is cleared: everything still announced is withdrawn.
    res.update(
        raw_checks(
            args.url, args.model, lambda: h.worker.req_client.clear(False).result(timeout=20)
        )
    )
    events = collect(h, lambda ev: left <= set(removed_hashes(ev)))
    cleared = removed_hashes(events)
    res["clear_removed_rest"] = left <= set(cleared)
    res["still_announced"] = len(h.worker._announced_kv_hashes)
    res["resyncs"] = {
        reason: counter._value.get() for reason, counter in h.worker._kv_event_resyncs.items()
    }
    res["ping_after"] = bool(h.worker.req_client.ping(h.instance_id).result(timeout=10))
    h.shutdown()
    common.emit(res)


if __name__ == "__main__":
    main()
