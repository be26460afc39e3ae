"""A KV-event subscriber that decodes with vLLM's own classes (run with the vLLM venv's python).

Nothing here imports kvhive: this is what a router built on vLLM's event format sees.  It
connects a SUB socket to every ``--endpoint`` (vLLM's ``ZmqEventPublisher`` or kvhive's
``--kv-events-endpoint``), decodes each ``[topic, seq (8 bytes, big-endian), payload]``
message with ``msgspec.msgpack.Decoder(vllm.distributed.kv_events.KVEventBatch)`` and writes
one JSON line per batch to ``--out`` (default stdout)::

    {"endpoint": ..., "topic": ..., "seq": 3, "ts": ..., "dp_rank": null,
     "events": [{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ...,
                 "token_ids": [...], "block_size": 256, "medium": "CPU", ...}, ...]}

A payload vLLM's decoder rejects is written as ``{"endpoint", "topic", "seq", "error"}``.
It prints ``READY`` on stdout (flushed) once every socket is connected, then runs until
SIGTERM/SIGINT or ``--seconds``.

``--replay ENDPOINT --from N`` instead asks a replay ROUTER as vLLM 0.32's publisher serves
it (a DEALER sends ``[b"", N as 8 bytes]``; the answer is ``[b"", topic, seq, payload]`` per
buffered batch with ``seq >= N``, then the end marker ``[b"", b"", seq -1, b""]``), writes each
batch, and exits 0 at the end marker (exit 3 when none arrives within ``--seconds``).

    $VLLM_PY vllm_kv_sub.py --endpoint tcp://10.0.0.2:5557 --out events.jsonl
    $VLLM_PY vllm_kv_sub.py --replay tcp://10.0.0.2:5558 --from 0 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import IO, Any

import msgspec
import zmq
from vllm.distributed.kv_events import KVEventBatch

_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def _event(ev: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(ev).__name__}
    for name in ev.__struct_fields__:
        value = getattr(ev, name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, list):
            value = [v.hex() if isinstance(v, bytes) else v for v in value]
        out[name] = value
    return out


def _line(endpoint: str, topic: bytes, seq: int, payload: bytes) -> dict[str, Any]:
    row: dict[str, Any] = {
        "endpoint": endpoint,
        "topic": topic.decode(errors="replace"),
        "seq": seq,
    }
    try:
        batch = _DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        row["error"] = str(exc)
        return row
    row.update(
        ts=batch.ts, dp_rank=batch.data_parallel_rank, events=[_event(e) for e in batch.events]
    )
    return row


def _write(out: IO[str], row: dict[str, Any]) -> None:
    out.write(json.dumps(row) + "\n")
    out.flush()


def subscribe(endpoints: list[str], topic: str, seconds: float | None, out: IO[str]) -> int:
    ctx = zmq.Context.instance()
    socks: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    for ep in endpoints:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.connect(ep)
        socks[sock] = ep
        poller.register(sock, zmq.POLLIN)
    print("READY", flush=True)
    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    deadline = None if seconds is None else time.monotonic() + seconds
    while not stop and (deadline is None or time.monotonic() < deadline):
        for sock, _ in poller.poll(100):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 3:
                    _write(out, {"endpoint": socks[sock], "error": f"{len(frames)} frames"})
                    continue
                topic_b, seq_b, payload = frames
                _write(
                    out,
                    _line(socks[sock], topic_b, int.from_bytes(seq_b, "big", signed=True), payload),
                )
    for sock in socks:
        sock.close(linger=0)
    return 0


def replay(endpoint: str, start: int, seconds: float, out: IO[str]) -> int:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart([b"", start.to_bytes(8, "big")])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        frames = sock.recv_multipart()
        if len(frames) != 4 or frames[0] != b"":
            _write(out, {"endpoint": endpoint, "error": f"{len(frames)} frames"})
            continue
        _, topic_b, seq_b, payload = frames
        seq = int.from_bytes(seq_b, "big", signed=True)
        if seq == -1:
            _write(out, {"endpoint": endpoint, "seq": -1, "end": True})
            sock.close(linger=0)
            return 0
        _write(out, _line(endpoint, topic_b, seq, payload))
    sock.close(linger=0)
    return 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", action="append", default=[], help="SUB connect (repeatable)")
    p.add_argument("--topic", default="", help="topic prefix to subscribe to")
    p.add_argument("--replay", help="a replay ROUTER endpoint: ask it instead of subscribing")
    p.add_argument("--from", dest="start", type=int, default=0, help="first sequence to replay")
    p.add_argument("--seconds", type=float, help="stop after this long")
    p.add_argument("--out", help="JSON lines file (default stdout)")
    a = p.parse_args(argv)
    out = open(a.out, "a", encoding="utf-8") if a.out else sys.stdout  # noqa: SIM115
    try:
        if a.replay:
            return replay(a.replay, a.start, a.seconds or 10.0, out)
        if not a.endpoint:
            p.error("--endpoint or --replay is required")
        return subscribe(a.endpoint, a.topic, a.seconds, out)
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
