"""vLLM KV events off the wire: decode batches, subscribe to many publishers, never block.

Needs ``pyzmq`` and ``msgspec`` (no vLLM import: the router starts in a second).  A publisher
(vLLM's ``ZmqEventPublisher``, or ``kvhive server --kv-events-endpoint``) sends multipart
``[topic, seq (8 bytes, big-endian), msgpack([ts, events, dp_rank])]``; events are maps tagged
``type`` (vLLM 0.32), or arrays ``["BlockStored", block_hashes, parent, token_ids,
block_size, lora_id, medium, ...]`` (older vLLM); both decode here.

Sequence gaps: when a batch's ``seq`` skips ahead, the subscriber asks the publisher's replay
ROUTER (if configured) for the missing batches, from a DEALER polled in the same loop, and
applies them in order before the live batches held meanwhile; when there is no replay
endpoint, or the replay cannot fill the gap (trimmed buffer, no answer in
``replay_timeout_s``), the replica's index is cleared (stale) and rebuilt from new events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
from route_index import Cleared, Event, Removed, Stored

log = logging.getLogger("kvrouter.events")
END_SEQ = -1


@dataclass(frozen=True, slots=True)
class Batch:
    """One decoded ``KVEventBatch``."""

    ts: float
    events: tuple[Event, ...]
    dp_rank: int | None


@dataclass(frozen=True, slots=True)
class Source:
    """One event publisher of a replica: a SUB endpoint and, optionally, its replay ROUTER."""

    replica: str
    endpoint: str
    replay: str | None = None
    topic: str = ""


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values or ())


def _event(raw: Any) -> Event | None:
    """A map event (``{"type": ...}``) or an array one (``["BlockStored", ...]``)."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        get = raw.get
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = {
            "BlockStored": (
                "type",
                "block_hashes",
                "parent_block_hash",
                "token_ids",
                "block_size",
                "lora_id",
                "medium",
            ),
            "BlockRemoved": ("type", "block_hashes", "medium"),
        }.get(kind, ("type",))
        fields = dict(zip(names, raw, strict=False))
        get = fields.get
    else:
        return None
    if kind == "BlockStored":
        parent = get("parent_block_hash")
        return Stored(_ints(get("block_hashes")), None if parent is None else int(parent),
                      _ints(get("token_ids")), int(get("block_size") or 0),
                      str(get("medium") or "GPU"))  # fmt: skip
    if kind == "BlockRemoved":
        return Removed(_ints(get("block_hashes")), str(get("medium") or "GPU"))
    if kind == "AllBlocksCleared":
        return Cleared()
    return None


def decode_batch(payload: bytes) -> Batch:
    """Decode one msgpack ``[ts, events, dp_rank]``; unknown event types are skipped.
    ``ValueError`` when the payload is not such an array."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not msgpack: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise ValueError(f"not a KVEventBatch array: {type(raw).__name__}")
    events = tuple(e for e in map(_event, raw[1]) if e is not None)
    dp = raw[2] if len(raw) > 2 else None
    return Batch(float(raw[0]), events, dp)


@dataclass(slots=True)
class _Stream:
    """Per-source state: the next expected seq, a replay in flight, batches held meanwhile."""

    source: Source
    sub: zmq.Socket
    expected: int | None = None
    replay_sock: zmq.Socket | None = None
    replay_deadline: float = 0.0
    held: list[tuple[int, Batch]] = field(default_factory=list)
    catchup: bool = False  # the start-up replay: whatever the publisher still buffers
    dup_floor: int | None = None  # after a replay: live copies of seqs from here are repeats


#: ``on_batch(source, batch)``, ``on_stale(source, reason)``
OnBatch = Callable[[Source, Batch], None]
OnStale = Callable[[Source, str], None]


class Subscriber(threading.Thread):
    """A daemon thread polling every source's SUB socket (and replay DEALERs)."""

    def __init__(self, sources: list[Source], on_batch: OnBatch, on_stale: OnStale,
                 replay_timeout_s: float = 5.0) -> None:  # fmt: skip
        super().__init__(name="kv-events", daemon=True)
        self.ctx = zmq.Context.instance()
        self.on_batch, self.on_stale = on_batch, on_stale
        self.replay_timeout_s = replay_timeout_s
        self.counters = {"batches": 0, "gaps": 0, "replays": 0, "replayed_batches": 0,
                         "stale": 0, "decode_errors": 0}  # fmt: skip
        self._halt = threading.Event()
        self.streams: list[_Stream] = []
        for src in sources:
            sub = self.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, src.topic.encode())
            sub.setsockopt(zmq.RCVHWM, 100_000)
            sub.connect(src.endpoint)
            st = _Stream(src, sub)
            self.streams.append(st)
            if src.replay:  # learn what was announced before the router started
                self._start_replay(st, 0, None)
                st.catchup = True

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            poller = zmq.Poller()
            for st in self.streams:
                poller.register(st.sub, zmq.POLLIN)
                if st.replay_sock is not None:
                    poller.register(st.replay_sock, zmq.POLLIN)
            ready = dict(poller.poll(100))
            for st in self.streams:
                if st.replay_sock is not None and st.replay_sock in ready:
                    self._drain_replay(st)
                if st.sub in ready:
                    self._drain_sub(st)
                if st.replay_sock is not None and time.monotonic() > st.replay_deadline:
                    self._replay_failed(st, "replay timed out")
        for st in self.streams:
            st.sub.close(linger=0)
            if st.replay_sock is not None:
                st.replay_sock.close(linger=0)

    def _decode(self, payload: bytes) -> Batch | None:
        try:
            return decode_batch(payload)
        except ValueError as exc:
            self.counters["decode_errors"] += 1
            log.warning("undecodable KV event batch: %s", exc)
            return None

    def _drain_sub(self, st: _Stream) -> None:
        while True:
            try:
                frames = st.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                self.counters["decode_errors"] += 1
                continue
            seq = int.from_bytes(frames[1], "big", signed=True)
            batch = self._decode(frames[2])
            if batch is None:
                continue
            if st.replay_sock is not None:  # apply after the replay, in order
                st.held.append((seq, batch))
                continue
            self._live(st, seq, batch)

    def _live(self, st: _Stream, seq: int, batch: Batch) -> None:
        exp = st.expected
        if exp is not None and seq < exp:
            if st.dup_floor is not None and seq >= st.dup_floor:
                return  # a live copy of a batch the replay already applied
            self._stale(st, f"sequence went back {exp} -> {seq} (publisher restarted)")
        elif (exp is not None and seq > exp) or (exp is None and seq > 0):
            if exp is not None:
                self.counters["gaps"] += 1
            if st.source.replay:
                self._start_replay(st, exp or 0, (seq, batch))
                return
            if exp is not None:
                self._stale(st, f"gap {exp}..{seq - 1}, no replay endpoint")
        st.dup_floor = None
        self._apply(st, seq, batch)

    def _apply(self, st: _Stream, seq: int, batch: Batch) -> None:
        st.expected = seq + 1
        self.counters["batches"] += 1
        self.on_batch(st.source, batch)

    def _stale(self, st: _Stream, reason: str) -> None:
        self.counters["stale"] += 1
        log.warning("%s (%s): index stale: %s", st.source.replica, st.source.endpoint, reason)
        self.on_stale(st.source, reason)

    def _start_replay(self, st: _Stream, start: int, first: tuple[int, Batch] | None) -> None:
        self.counters["replays"] += 1
        sock = self.ctx.socket(zmq.DEALER)
        sock.connect(str(st.source.replay))
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        st.replay_sock, st.replay_deadline = sock, time.monotonic() + self.replay_timeout_s
        st.expected = st.dup_floor = start
        st.held = [first] if first else []

    def _drain_replay(self, st: _Stream) -> None:
        assert st.replay_sock is not None
        while st.replay_sock is not None:
            try:
                frames = st.replay_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # vLLM 0.32 answers [b"", topic, seq, payload]; others [b"", seq, payload]
            body = frames[1:] if frames and frames[0] == b"" else frames
            if len(body) == 3:
                body = body[1:]
            if len(body) != 2:
                self.counters["decode_errors"] += 1
                continue
            seq = int.from_bytes(body[0], "big", signed=True)
            if seq == END_SEQ:
                self._end_replay(st)
                return
            assert st.expected is not None
            if seq < st.expected:
                continue
            if seq > st.expected and not st.catchup:  # the publisher no longer holds the gap
                self._replay_failed(st, f"replay starts at {seq}, needed {st.expected}")
                return
            batch = self._decode(body[1])
            if batch is not None:
                self.counters["replayed_batches"] += 1
                self._apply(st, seq, batch)

    def _close_replay(self, st: _Stream) -> list[tuple[int, Batch]]:
        assert st.replay_sock is not None
        st.replay_sock.close(linger=0)
        st.replay_sock, st.catchup = None, False
        held, st.held = st.held, []
        return held

    def _end_replay(self, st: _Stream) -> None:
        for seq, batch in self._close_replay(st):
            if st.expected is not None and seq < st.expected:
                continue  # the replay already applied it
            if st.expected is not None and seq > st.expected:
                self._stale(st, f"gap {st.expected}..{seq - 1} after replay")
            self._apply(st, seq, batch)

    def _replay_failed(self, st: _Stream, reason: str) -> None:
        if not st.catchup:  # the start-up replay had nothing to lose
            self._stale(st, reason)
        held = self._close_replay(st)
        st.expected = st.dup_floor = None
        for seq, batch in held:
            self._apply(st, seq, batch)
