"""The direct KV-event publisher: vLLM's wire format straight from the server.

``--kv-events-endpoint`` binds a ZMQ PUB socket that sends what vLLM's ``ZmqEventPublisher``
sends, so a KV-aware router (vLLM's, NVIDIA Dynamo, llm-d) can index kvhive without going
through an engine (docs/kv-events.md)::

    [topic, seq (8 bytes, big-endian, from 0), msgpack(KVEventBatch)]
    KVEventBatch = [ts, events, data_parallel_rank (0)]             (array)
    BlockStored  = {"type": "BlockStored", "block_hashes": [h], "parent_block_hash": p,
                    "token_ids": [...], "block_size": chunk size, "lora_id": None,
                    "medium": "CPU" | "STORAGE", "lora_name": None}
    BlockRemoved = {"type": "BlockRemoved", "block_hashes": [...], "medium": ...}

with ``--kv-events-layout array`` the events are msgspec ``array_like`` arrays instead
(``["BlockStored", block_hashes, parent, token_ids, block_size, lora_id, medium,
lora_name]``).  Hashes are kvhive's chunk hashes as unsigned 64-bit ints,
``int.from_bytes(chunk_hash, "big") & (2**64 - 1)``: what vLLM's ``maybe_convert_block_hash``
makes of the LMCache connector's bytes hashes, so this stream and the one through the
engine carry the same int for a chunk.  ``--kv-events-topic`` may hold ``{model}``: then
each batch holds one model's events and its topic names the model.

``--kv-events-replay-endpoint`` binds a ROUTER answering as vLLM 0.32's publisher does: a
DEALER sends ``[b"", start_seq (8B)]`` and gets ``[b"", topic, seq, payload]`` for each
buffered batch with ``seq >= start`` (the newest ``--kv-events-buffer-steps``), then the end
marker ``[b"", b"", -1 (8B signed), b""]``.  A malformed request (other frame counts, a start
that is not 8 bytes) gets the end marker alone.

Threads: one daemon thread (``kvhive-kv-publisher``) owns both sockets after start.  It
reads the :class:`~kvhive.observability.kv_events.KVEventLog` with its own cursor over all
models, woken through a pipe the log's bus-thread listener writes one byte to (only when no
wake-up is pending), so the store and lookup paths never wait on it.  Sends never block:
``NOBLOCK`` and a high-water mark (``--kv-events-hwm``); a subscriber that falls behind
loses messages, sees a sequence gap and fills it from the replay socket.

Losses in the log itself (the ring overran the publisher's cursor, or the bus dropped
events): the publisher skips one sequence number.  Subscribers see a gap that replay cannot
fill (that sequence never existed), which tells them their view may be stale; it is
counted (``lost_gaps``) and logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvhive.config.fields import flag_of
from kvhive.config.kv_events import KVEventsConfig
from kvhive.errors import ConfigError
from kvhive.observability.kv_events import KVEventLog, Record
from kvhive.wire import types as t

log = logging.getLogger(__name__)

HASH_MASK = (1 << 64) - 1
END_SEQ = (-1).to_bytes(8, "big", signed=True)
READ_BATCH = 1024  # log records per read (and at most per published batch)
_WARN_EVERY_S = 10.0


def block_hash(chunk_hash: bytes) -> int:
    """The int a vLLM-format event carries for ``chunk_hash`` (vLLM's conversion)."""
    return int.from_bytes(chunk_hash, "big") & HASH_MASK


# ---- vLLM's structs, mirrored (token_ids arrive pre-encoded from the log) ---------------------


class _MapStored(msgspec.Struct, tag="BlockStored", tag_field="type"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: msgspec.Raw
    block_size: int
    lora_id: int | None
    medium: str
    lora_name: str | None


class _MapRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type"):
    block_hashes: list[int]
    medium: str


class _ArrayStored(msgspec.Struct, tag="BlockStored", array_like=True):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: msgspec.Raw
    block_size: int
    lora_id: int | None
    medium: str
    lora_name: str | None


class _ArrayRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True):
    block_hashes: list[int]
    medium: str


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[Any]
    data_parallel_rank: int


_ENCODER = msgspec.msgpack.Encoder()


def encode_batch(records: Iterable[Record], block_size: int, layout: str, ts: float) -> bytes:
    """One ``KVEventBatch`` payload of ``records`` (stored and removed records)."""
    stored, removed = (
        (_ArrayStored, _ArrayRemoved) if layout == "array" else (_MapStored, _MapRemoved)
    )
    events: list[Any] = []
    for rec in records:
        hashes = [block_hash(h) for h in rec.hashes]
        if rec.kind == t.KV_EVENT_KIND_STORED:
            parent = None if rec.parent is None else block_hash(rec.parent)
            events.append(stored(hashes, parent, rec.tokens, block_size, None, rec.medium, None))
        else:
            events.append(removed(hashes, rec.medium))
    return _ENCODER.encode(_Batch(ts, events, 0))


@dataclass(slots=True)
class PublisherCounters:
    """Counters for /status and /metrics (written by the publisher thread only)."""

    published_batches: int = 0
    published_events: int = 0
    dropped_batches: int = 0  # the PUB socket refused a send (NOBLOCK)
    lost_gaps: int = 0  # sequence numbers skipped for records the log lost
    replays: int = 0
    malformed_replays: int = 0


def _bind(sock: zmq.Socket, endpoint: str, flag: str) -> str:
    """Bind ``sock``; an endpoint that cannot be bound is a ConfigError naming ``flag``."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(flag, f"{endpoint}: cannot bind: {exc}") from exc
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


class KVEventPublisher:
    """See the module docstring.  Binds in the constructor (ConfigError when it cannot),
    publishes from :meth:`start` until :meth:`close`."""

    def __init__(self, events: KVEventLog, cfg: KVEventsConfig, *, block_size: int) -> None:
        flag = flag_of(KVEventsConfig, "kv_events_endpoint")
        if cfg.kv_events_endpoint is None:
            raise ConfigError(flag, "not set")
        if not events.enabled:
            raise ConfigError(
                flag, "needs the KV-event log (--kv-event-log-size > 0, observability on)"
            )
        self._log = events
        self.block_size = block_size
        self.topic = cfg.kv_events_topic
        self.layout = cfg.kv_events_layout
        self._per_model = "{model}" in self.topic
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=cfg.kv_events_buffer_steps)
        self.counters = PublisherCounters()
        self._seq = 0
        self._cursor = 0
        self._warned_at = -_WARN_EVERY_S
        self._ctx = zmq.Context()
        self._replay: zmq.Socket | None = None
        self._pub = self._ctx.socket(zmq.PUB)
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, cfg.kv_events_hwm)
            self.endpoint = _bind(self._pub, cfg.kv_events_endpoint, flag)
            self.replay_endpoint: str | None = None
            if cfg.kv_events_replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self.replay_endpoint = _bind(
                    self._replay,
                    cfg.kv_events_replay_endpoint,
                    flag_of(KVEventsConfig, "kv_events_replay_endpoint"),
                )
        except BaseException:
            self._close_sockets()
            raise
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._signalled = False
        self._fd_lock = threading.Lock()
        self._fds_closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvhive-kv-publisher", daemon=True)
        events.add_listener(self.wake)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        log.info(
            "KV events: publishing on %s%s (topic %r, %s layout)",
            self.endpoint,
            f", replay on {self.replay_endpoint}" if self.replay_endpoint else "",
            self.topic,
            self.layout,
        )

    def wake(self) -> None:
        """New records (bus thread): one pipe byte unless a wake-up is pending; never blocks."""
        if self._signalled:
            return
        self._signalled = True
        with self._fd_lock:  # close() must not free the fd number under a write
            if not self._fds_closed:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending
                    os.write(self._wfd, b"w")

    def close(self) -> None:
        """Stop the thread (it publishes what the log holds first) and close the sockets."""
        self._stop.set()
        self._signalled = False
        self.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._close_sockets()
        with self._fd_lock:
            if not self._fds_closed and not self._thread.is_alive():
                self._fds_closed = True
                os.close(self._rfd)
                os.close(self._wfd)

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        if not self._ctx.closed:
            self._ctx.term()

    # ---- the publisher thread ------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._rfd, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while True:
            try:
                ready = dict(poller.poll(1000))
                if self._rfd in ready:
                    self._drain_pipe()
                if self._replay is not None and self._replay in ready:
                    self._serve_replays()
                self._pump()
            except Exception:  # task boundary: log, keep publishing
                log.exception("KV-event publisher failed; continuing")
                time.sleep(0.1)
            if self._stop.is_set():
                self._pump()
                return

    def _drain_pipe(self) -> None:
        """Empty the wake-up pipe, then re-arm :meth:`wake`.  In this order: a wake that
        lands while the pipe is drained is suppressed (its byte may be read here), but its
        records were appended before it, so the :meth:`_pump` after this call reads them; a
        wake after the re-arm writes a new byte.  (Re-arming first could leave the flag set
        with the pipe empty, and later records would wait for the 1 s poll timeout.)"""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        self._signalled = False

    def _pump(self) -> None:
        """Publish everything the log holds past the cursor."""
        while True:
            page = self._log.read_all(self._cursor, READ_BATCH)
            self._cursor = page.next_cursor
            if page.lost:
                self._lost()
            if not page.records:
                return
            self._publish(page.records)

    def _lost(self) -> None:
        self.counters.lost_gaps += 1
        self._seq += 1  # a gap no replay can fill: the subscriber's view may be stale
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "KV events: the log lost records before the publisher read them (ring "
                "overrun or event-bus drops); sequence %d skipped (%d gaps so far)",
                self._seq - 1,
                self.counters.lost_gaps,
            )

    def _publish(self, records: list[Record]) -> None:
        groups: dict[str, list[Record]] = {}
        if self._per_model:
            for rec in records:
                groups.setdefault(rec.model_name, []).append(rec)
        else:
            groups[""] = records
        ts = time.time()
        for model, recs in groups.items():
            topic = self.topic.replace("{model}", model).encode()
            payload = encode_batch(recs, self.block_size, self.layout, ts)
            seq, self._seq = self._seq, self._seq + 1
            try:
                self._pub.send_multipart([topic, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
            except zmq.Again:
                self.counters.dropped_batches += 1
            self._buffer.append((seq, topic, payload))
            self.counters.published_batches += 1
            self.counters.published_events += len(recs)

    def _serve_replays(self) -> None:
        assert self._replay is not None
        while self._replay.poll(0):
            frames = self._replay.recv_multipart()
            ident = frames[0]
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                self.counters.malformed_replays += 1
                self._reply(ident, b"", END_SEQ, b"")
                continue
            self.counters.replays += 1
            start = int.from_bytes(frames[2], "big", signed=True)
            for seq, topic, payload in list(self._buffer):
                if seq >= start and not self._reply(ident, topic, seq.to_bytes(8, "big"), payload):
                    break
            self._reply(ident, b"", END_SEQ, b"")

    def _reply(self, ident: bytes, topic: bytes, seq: bytes, payload: bytes) -> bool:
        """One replay message, vLLM's framing ``[ident, b"", topic, seq, payload]``."""
        assert self._replay is not None
        try:
            self._replay.send_multipart([ident, b"", topic, seq, payload], zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    # ---- reporting -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "topic": self.topic,
            "layout": self.layout,
            "block_size": self.block_size,
            "next_seq": self._seq,
            "log_cursor": self._cursor,
            "buffered_batches": len(self._buffer),
            "published_batches": c.published_batches,
            "published_events": c.published_events,
            "dropped_batches": c.dropped_batches,
            "lost_gaps": c.lost_gaps,
            "replays": c.replays,
            "malformed_replays": c.malformed_replays,
        }

    def metrics(self) -> Iterable[Metric]:
        """Prometheus families (scrape thread; plain int reads)."""
        c = self.counters
        for name, doc, value in (
            ("published_batches", "KV-event batches published.", c.published_batches),
            ("published_events", "KV events published.", c.published_events),
            ("dropped_batches", "KV-event batches the PUB socket refused.", c.dropped_batches),
            ("lost_gaps", "Sequence numbers skipped for records the log lost.", c.lost_gaps),
            ("replays", "KV-event replay requests served.", c.replays),
            ("malformed_replays", "Malformed KV-event replay requests.", c.malformed_replays),
        ):
            fam = CounterMetricFamily(f"kvhive_kv_events_{name}", doc)
            fam.add_metric([], value)
            yield fam
        g = GaugeMetricFamily("kvhive_kv_events_buffered_batches", "Batches kept for replay.")
        g.add_metric([], len(self._buffer))
        yield g
