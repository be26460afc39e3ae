"""Soak test: a real ``kvhive server`` under random valid and hostile traffic for a fixed time.

    .venv/bin/python benchmarks/soak.py --seconds 60 [--clients 4] [--json soak.json]

What runs (all at once, for ``--seconds``):

* ``kvhive server`` (a subprocess on free loopback ports, ``--max-workers 4``, an ``fs`` L2
  tier unless ``--no-l2``), restarted if it dies (each death is counted);
* ``--clients`` engine processes, each with its own shared-memory KV cache (vLLM's CPU
  layout, registered over the wire) and kvhive's own client, doing random operations:

  - valid: store a random prefix (or a sub-range) of one of ``--docs`` shared documents;
    lookup then retrieve, verifying every retrieved chunk against the deterministic pattern
    of that (document, chunk) — any client may have stored it; lookup then
    free_lookup_locks; ping/noop; unregister and register again (same or new instance id);
  - invalid: malformed frames (bad msgpack, unknown ops, missing or mistyped arguments,
    deeply nested msgpack, truncated frames), out-of-range and negative block ids, unknown
    instance ids, bad token ranges, forbidden model names;

* the parent SIGKILLs a random client every ``--kill-every`` seconds and starts a new one,
  and force-clears L1 every ``--clear-every`` seconds, alternating the ``clear`` protocol
  op and ``POST /cache/clear {"force": true}``.

Every request has a deadline (``--timeout``).  Reported figures:

    wrong_chunks / wrong_bytes   retrieves answered "ok" whose bytes differ    must be 0
    unanswered                   requests (or lookups) that got no answer       must be 0
    server_crashes               server deaths (each restarted)                 must be 0
    rss_growth_mb                server RSS at the end minus after start-up
    ops                          operations done, by kind; ``bad_accepted``: hostile stores
                                 answered "success" for a chunk that is not resident

The exit status is 1 when a must-be-zero figure is not 0 (2 on a harness failure).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

from kvhive.bench.config import SHAPES, KVShape
from kvhive.bench.kvengine import STUB_EVENT, KvhiveEngine, make_tokens
from kvhive.bench.servers import ServerProcess
from kvhive.client import KvhiveClient, RemoteError
from kvhive.client.sync import RawFrame
from kvhive.wire import types as t
from kvhive.wire.frames import recv_frames, send_frames

#: Per-client counters, one int64 each in a shared array (a killed client keeps its counts).
FIELDS = (
    "ops", "stores", "stores_ok", "retrieves", "retrieves_ok", "lookups", "hit_chunks",
    "verified_chunks", "wrong_chunks", "wrong_bytes", "unanswered", "invalid_sent",
    "invalid_answered", "bad_accepted", "reregisters", "client_errors", "starts",
)  # fmt: skip
MUST_BE_ZERO = ("wrong_chunks", "wrong_bytes", "unanswered", "server_crashes")
MODEL = "soak/model"
POISON = 0xBEEF


class Unanswered(Exception):
    """A request got no answer within ``--timeout`` (already counted and logged)."""


# -- one client process ---------------------------------------------------------------------


class Client:
    """One engine process's state: its KV cache, its clients and its counters."""

    def __init__(self, args: argparse.Namespace, slot: int, counters: Any, log_path: str) -> None:
        self.args, self.slot, self.c = args, slot, counters
        self.rng = random.Random(args.seed * 7919 + slot * 104729 + os.getpid())
        self.url = args.url
        self.shape: KVShape = SHAPES[args.shape]
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        self.eng = KvhiveEngine(self.url, self.shape, num_chunks=2 * args.chunks,
                                model_name=MODEL, timeout=args.timeout)  # fmt: skip
        self.C, self.bpc = self.eng.chunk_size, self.eng.blocks_per_chunk
        self.num_blocks = self.eng.kv.num_blocks
        self.docs = [make_tokens(args.seed * 1_000_003 + d, args.chunks * self.C)
                     for d in range(args.docs)]  # fmt: skip
        # One hostile document per client: a store that another client's concurrent
        # (failing) store of the same chunk holds a reservation for is answered as skipped
        # (the first writer provides it), which is not a claim of this store's own data.
        self.bad_doc = make_tokens((args.seed ^ 0xBAD) * 1_000_003 + slot, 2 * self.C)
        shape = self.eng.kv.layers[0][:, : self.bpc].shape
        rng = np.random.default_rng(args.seed)  # the same in every client
        self._base = [rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
                      for _ in self.eng.kv.layers]  # fmt: skip
        self.raw = self._raw_socket()
        self.uids = 1 << 40

    # -- bookkeeping --

    def count(self, name: str, n: int = 1) -> None:
        self.c[FIELDS.index(name)] += n

    def note(self, msg: str) -> None:
        self.log.write(f"{time.strftime('%H:%M:%S')} client {self.slot} pid {os.getpid()}: {msg}\n")

    def _raw_socket(self) -> zmq.Socket:
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(self.args.timeout * 1000))
        sock.connect(self.url)
        return sock

    def reconnect(self) -> None:
        """A fresh socket after a timeout: a late reply must not answer the next request."""
        self.eng.client.close()
        self.eng.client = KvhiveClient(self.url, timeout=self.args.timeout)

    def call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run one request; a timeout is counted, logged and raised as :class:`Unanswered`."""
        try:
            return fn(*args)
        except TimeoutError:
            self.unanswered(f"no answer to {what} within {self.args.timeout} s")

    def unanswered(self, msg: str) -> None:
        self.count("unanswered")
        self.note(msg)
        self.reconnect()
        raise Unanswered(msg)

    # -- KV contents --

    def pattern(self, doc: int, chunk: int) -> list[np.ndarray]:
        """The bytes every client stores for chunk ``chunk`` of document ``doc``, per layer:
        a fixed random base per layer plus a per-chunk constant (mod 2^16), so two chunks
        differ in every element and no chunk needs caching."""
        salt = np.uint16((doc * self.args.chunks + chunk + 1) * 40503 % 65536)  # odd: injective
        return [base + salt for base in self._base]

    def blocks(self, region: int, chunk: int, n: int) -> list[int]:
        """Block ids of chunks ``[chunk, chunk + n)`` of region 0 (store) or 1 (retrieve)."""
        return self.eng.chunk_blocks(region * self.args.chunks + chunk, n)

    def _write(self, blocks: list[int], pats: list[np.ndarray]) -> None:
        a = blocks[0]
        for layer, pat in zip(self.eng.kv.layers, pats, strict=True):
            layer[:, a : a + self.bpc] = pat

    # -- operations --

    def op_store(self) -> None:
        doc, n = self.rng.randrange(self.args.docs), self.rng.randint(1, self.args.chunks)
        a = self.rng.choice([0, 0, self.rng.randrange(n)])  # mostly prefixes, sometimes a tail
        for i in range(a, n):
            self._write(self.blocks(0, i, 1), self.pattern(doc, i))
        self.count("stores")
        rid = f"s{self.slot}-{self.rng.getrandbits(32)}"
        ok = self.call("store", self.eng.store, rid, self.docs[doc],
                       self.blocks(0, a, n - a), a * self.C, n * self.C)  # fmt: skip
        self.count("stores_ok", int(bool(ok)))
        if self.rng.random() < 0.5:
            self.call("end_session", self.eng.end_session, rid)

    def lookup(self, rid: str, tokens: list[int]) -> int:
        """Lookup and poll its result (Unanswered when it never comes)."""
        self.count("lookups")
        self.call("lookup", self.eng.client.call, "lookup",
                  self.eng.key(rid, tokens, 0, len(tokens), worker=None), 1)  # fmt: skip
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            hit = self.call("query_prefetch_status", self.eng.client.call,
                            "query_prefetch_status", rid)  # fmt: skip
            if hit is not None:
                self.count("hit_chunks", int(hit))
                return int(hit)
            time.sleep(0.002)
        self.unanswered(f"lookup {rid} had no result within {self.args.timeout} s")
        return 0

    def op_retrieve(self) -> None:
        doc, n = self.rng.randrange(self.args.docs), self.rng.randint(1, self.args.chunks)
        rid = f"r{self.slot}-{self.rng.getrandbits(32)}"
        tokens = self.docs[doc][: n * self.C]
        hit = self.lookup(rid, tokens)
        if not hit:
            return
        if self.rng.random() < 0.2:  # the engine decides to recompute after all
            self.call("free_lookup_locks", self.eng.client.call, "free_lookup_locks",
                      self.eng.key(rid, tokens, 0, hit * self.C, worker=None), 1)  # fmt: skip
            self.call("end_session", self.eng.end_session, rid)
            return
        dst = self.blocks(1, 0, hit)
        for layer in self.eng.kv.layers:
            layer[:, dst[0] : dst[-1] + 1] = POISON
        self.count("retrieves")
        ok = self.call("retrieve", self.eng.retrieve, rid, self.docs[doc], dst, 0, hit * self.C)
        if ok:
            self.count("retrieves_ok")
            self.verify(doc, hit)
        self.call("end_session", self.eng.end_session, rid)

    def verify(self, doc: int, hit: int) -> None:
        itemsize = self.shape.itemsize
        for i in range(hit):
            a = self.blocks(1, i, 1)[0]
            wrong = 0
            for layer, pat in zip(self.eng.kv.layers, self.pattern(doc, i), strict=True):
                wrong += int(np.count_nonzero(layer[:, a : a + self.bpc] != pat))
            self.count("verified_chunks")
            if wrong:
                self.count("wrong_chunks")
                self.count("wrong_bytes", wrong * itemsize)
                self.note(f"WRONG BYTES: doc {doc} chunk {i}: {wrong} of "
                          f"{sum(p.size for p in self.pattern(doc, i))} elements differ")  # fmt: skip

    def op_ping(self) -> None:
        if self.rng.random() < 0.5:
            self.call("noop", self.eng.client.call, "noop")
        else:
            self.call("ping", self.eng.client.call, "ping", self.rng.getrandbits(20))

    def op_reregister(self) -> None:
        self.call("unregister", self.eng.client.call, "unregister_kv_cache", self.eng.instance_id)
        if self.rng.random() < 0.3:
            self.eng.instance_id = random.getrandbits(62)
        self.call("register", self.eng.register)
        self.count("reregisters")

    def op_bad_request(self) -> None:
        """A well-formed request the server must refuse (soft failure or error reply)."""
        self.count("invalid_sent")
        toks = self.bad_doc  # never retrieved: a wrongly accepted store cannot pollute the docs
        good = self.blocks(0, 0, 1)
        kind = self.rng.randrange(6)
        rid = f"bad{self.slot}-{self.rng.getrandbits(32)}"
        key = self.eng.key(rid, toks, 0, self.C)
        inst = self.eng.instance_id
        if kind == 0:  # block ids out of range / negative / huge
            bad = self.rng.choice([self.num_blocks + 3, -1, 1 << 40])
            blocks = [*good[:-1], bad]
            args: tuple[Any, ...] = ("store", key, inst, [blocks], STUB_EVENT)
        elif kind == 1:
            bad = self.rng.choice([self.num_blocks, -5, 1 << 50])
            args = ("retrieve", key, inst, [[bad] * self.bpc], STUB_EVENT, 0)
        elif kind == 2:  # unknown instance
            args = ("store", key, random.getrandbits(62), [good], STUB_EVENT)
        elif kind == 3:  # bad token range
            key = t.CacheKey(MODEL, 1, 0, toks, 2 * self.C, self.C, rid, "", None, 1)
            args = ("store", key, inst, [good], STUB_EVENT)
        elif kind == 4:  # forbidden model name
            key = t.CacheKey("bad@model", 1, 0, toks, 0, self.C, rid, "", None, 1)
            args = ("store", key, inst, [good], STUB_EVENT)
        else:  # too few blocks for the range
            key = self.eng.key(rid, toks, 0, 2 * self.C)
            args = ("store", key, inst, [good[:3]], STUB_EVENT)
        try:
            reply = self.call(f"bad request kind {kind}", self.eng.client.call, *args)
        except RemoteError:
            self.count("invalid_answered")
            return
        self.count("invalid_answered")
        if isinstance(reply, (list, tuple)) and len(reply) > 1 and reply[1] is True:
            # Success is fine for a chunk already resident (nothing copied); otherwise the
            # server claimed a store it did not do (e.g. the key is held by a reservation).
            hit = self.lookup(rid + "-chk", self.bad_doc[: self.C])
            self.call("end_session", self.eng.end_session, rid + "-chk")
            if not hit:
                self.count("bad_accepted")
                self.note(f"bad request kind {kind} ({args[0]}, blocks {args[3]}) answered "
                          "success, yet the chunk is not resident")  # fmt: skip

    def op_malformed(self) -> None:
        """Frames that do not decode; each must still be answered (same uid)."""
        self.count("invalid_sent")
        enc = msgspec.msgpack.encode
        self.uids += 1
        uid = enc(self.uids)
        key = enc(self.eng.key("m", self.docs[0], 0, self.C))
        cases = [
            [uid, b"\xc1"],  # never-used msgpack byte as the op
            [uid, enc(999)],  # unknown op id
            [uid, enc("no_such_op")],
            [uid, enc(6)],  # store without arguments
            [uid, enc(6), enc(1), enc(2), enc(3), enc(4)],  # store, mistyped arguments
            [uid, enc(8), key[: len(key) // 2], enc(1)],  # lookup, truncated key
            [uid, enc(8), b"\x91" * 3000 + b"\x00", enc(1)],  # deeply nested argument
            [uid, b"\x91" * 3000 + b"\x00"],  # deeply nested op frame
            [uid, enc(22), enc("not an int")],  # ping, mistyped
            [uid, enc(24), enc(1), enc(2)],  # noop with extra frames
            [uid, enc(7), RawFrame(os.urandom(64)), enc(1), enc([[1]]), enc(b""), enc(0)],
        ]
        case = self.rng.randrange(len(cases))
        try:
            send_frames(self.raw, [bytes(f) for f in cases[case]])
            while True:
                frames = recv_frames(self.raw)
                if frames[0] == uid:
                    break
        except zmq.Again:
            self.raw.close(0)
            self.raw = self._raw_socket()
            self.unanswered(f"no answer to malformed frame case {case}")
        self.count("invalid_answered")

    def run(self, deadline: float) -> None:
        with contextlib.suppress(Unanswered):
            self.call("register", self.eng.register)
        ops = [(self.op_store, 30), (self.op_retrieve, 30), (self.op_ping, 8),
               (self.op_bad_request, 12), (self.op_malformed, 12), (self.op_reregister, 2)]  # fmt: skip
        fns, weights = zip(*ops, strict=True)
        while time.monotonic() < deadline:
            fn = self.rng.choices(fns, weights)[0]
            try:
                fn()
            except Unanswered:
                pass
            except (RemoteError, RuntimeError, zmq.ZMQError, ValueError) as exc:
                self.count("client_errors")
                self.note(f"{fn.__name__}: {type(exc).__name__}: {exc}")
                self.reconnect()
            self.count("ops")

    def close(self) -> None:
        self.raw.close(0)
        self.eng.close()
        self.log.close()


def client_main(args: argparse.Namespace, slot: int, counters: Any, deadline: float) -> None:
    """Entry point of a client process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    counters[FIELDS.index("starts")] += 1
    client = Client(args, slot, counters, os.path.join(args.workdir, f"client-{slot}.log"))
    try:
        client.run(deadline)
    finally:
        client.close()


# -- the parent: server, clients, chaos -------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = mp.get_context("spawn")
        self.counters = [self.ctx.Array("q", len(FIELDS), lock=False) for _ in range(args.clients)]
        self.procs: list[Any] = [None] * args.clients
        self.figures: dict[str, Any] = {"server_crashes": 0, "crash_exit_codes": [],
                                        "clients_killed": 0, "clears_protocol": 0,
                                        "clears_http": 0, "clear_failures": 0,
                                        "unhealthy_polls": 0}  # fmt: skip
        self.unanswered_parent = 0
        self.rss: list[int] = []
        self.stop = threading.Event()
        extra = ["--max-workers", "4", "--chunk-size", str(args.chunk_size)]
        if not args.no_l2:
            l2 = {"type": "fs", "base_path": os.path.join(args.workdir, "l2")}
            extra += ["--l2-adapter", json.dumps(l2)]
        self.server = ServerProcess("kvhive", args.l1_size_gb, extra=extra,
                                    log_path=Path(args.workdir) / "server.log")  # fmt: skip

    def start_client(self, slot: int) -> None:
        proc = self.ctx.Process(target=client_main, daemon=True,
                                args=(self.args, slot, self.counters[slot], self.deadline))  # fmt: skip
        proc.start()
        self.procs[slot] = proc

    def kill_client(self, slot: int) -> None:
        proc = self.procs[slot]
        if proc is None or not proc.is_alive():
            return
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        self.figures["clients_killed"] += 1
        for path in glob.glob(f"/dev/shm/kvhive_bench_{proc.pid}_*"):  # its KV cache
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def watch_server(self) -> None:
        """Count server deaths (and restart it), unhealthy polls, and sample its RSS."""
        while not self.stop.wait(0.5):
            if not self.server.alive():
                code = self.server.proc.returncode if self.server.proc else None
                self.figures["server_crashes"] += 1
                self.figures["crash_exit_codes"].append(code)
                _say(f"soak: SERVER DIED (exit {code}); restarting")
                self.server.stop()
                try:
                    self.server.start()
                except RuntimeError as exc:
                    _say(f"soak: restart failed: {exc}")
                    self.stop.set()
                continue
            if not self.server.healthy(timeout=self.args.timeout):
                self.figures["unhealthy_polls"] += 1
            rss = self.server.rss_bytes()
            if rss:
                self.rss.append(rss)

    def chaos(self) -> None:
        """Force-clear L1 every ``--clear-every`` s (protocol op and HTTP, alternating)."""
        n = 0
        while not self.stop.wait(self.args.clear_every):
            n += 1
            force = n % 4 != 0  # every fourth clear is a polite one
            try:
                if n % 2:
                    with KvhiveClient(self.server.rpc_url, timeout=self.args.timeout) as c:
                        c.call("clear", force)
                    self.figures["clears_protocol"] += 1
                else:
                    req = urllib.request.Request(
                        self.server.http_url + "/cache/clear", method="POST",
                        data=json.dumps({"force": force}).encode(),
                        headers={"content-type": "application/json"},
                    )  # fmt: skip
                    with urllib.request.urlopen(req, timeout=self.args.timeout) as r:
                        r.read()
                    self.figures["clears_http"] += 1
            except TimeoutError:
                self.unanswered_parent += 1
                _say("soak: a clear got no answer")
            except (OSError, RemoteError) as exc:
                if isinstance(getattr(exc, "reason", None), TimeoutError):
                    self.unanswered_parent += 1
                    _say("soak: a clear got no answer")
                    continue
                self.figures["clear_failures"] += 1
                _say(f"soak: clear failed: {exc}")

    def run(self) -> dict[str, Any]:
        args = self.args
        self.server.start()
        self.server.settle(timeout_s=30)
        rss_start = self.server.rss_bytes()
        t0 = time.monotonic()
        self.deadline = t0 + args.seconds
        args.url = self.server.rpc_url
        for slot in range(args.clients):
            self.start_client(slot)
        threads = [threading.Thread(target=f, daemon=True) for f in (self.watch_server, self.chaos)]
        for th in threads:
            th.start()
        rng = random.Random(args.seed)
        next_kill = t0 + args.kill_every
        while time.monotonic() < self.deadline and not self.stop.is_set():
            time.sleep(0.1)
            if args.kill_every > 0 and time.monotonic() >= next_kill:
                next_kill += args.kill_every
                slot = rng.randrange(args.clients)
                self.kill_client(slot)
                if time.monotonic() < self.deadline - 1:
                    self.start_client(slot)
            for slot, proc in enumerate(self.procs):  # a client that died by itself
                if proc is not None and proc.exitcode not in (None, 0, -signal.SIGKILL):
                    _say(f"soak: client {slot} exited with {proc.exitcode}")
                    self.figures.setdefault("client_failures", 0)
                    self.figures["client_failures"] += 1
                    self.procs[slot] = None
        stuck = 0
        for slot, proc in enumerate(self.procs):
            if proc is None:
                continue
            proc.join(3 * args.timeout + 10)
            if proc.is_alive():
                stuck += 1
                self.kill_client(slot)
        self.stop.set()
        for th in threads:
            th.join(args.timeout + 5)
        elapsed = time.monotonic() - t0
        alive = self.server.alive()
        healthy = alive and self.server.healthy(timeout=args.timeout)
        rss_end = self.server.rss_bytes()
        status = self._status() if alive else {}
        self.server.stop()
        return self.report(elapsed, rss_start, rss_end, stuck, healthy, status)

    def _status(self) -> dict[str, Any]:
        try:
            return dict(self.server.status())
        except (OSError, ValueError):
            return {}

    def report(self, elapsed: float, rss_start: int, rss_end: int, stuck: int, healthy: bool,
               status: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        totals = {name: sum(int(c[i]) for c in self.counters) for i, name in enumerate(FIELDS)}
        totals["unanswered"] += self.unanswered_parent
        mb = 1 << 20
        quarters = (
            [round(self.rss[len(self.rss) * q // 4] / mb, 1) for q in (1, 2, 3)] if self.rss else []
        )
        out: dict[str, Any] = {
            "seconds": round(elapsed, 1),
            "clients": self.args.clients,
            "wrong_chunks": totals["wrong_chunks"],
            "wrong_bytes": totals["wrong_bytes"],
            "unanswered": totals["unanswered"],
            "server_crashes": self.figures["server_crashes"],
            "server_healthy_at_end": healthy,
            "rss_start_mb": round(rss_start / mb, 1),
            "rss_end_mb": round(rss_end / mb, 1),
            "rss_peak_mb": round(max([rss_start, rss_end, *self.rss]) / mb, 1),
            "rss_growth_mb": round((rss_end - rss_start) / mb, 1),
            "rss_mb_by_quarter": quarters,
            "stuck_clients": stuck,
            "ops": {k: v for k, v in totals.items() if k not in MUST_BE_ZERO},
            **{k: v for k, v in self.figures.items() if k != "server_crashes"},
            "server_counters": status.get("counters", {}),
            "workdir": self.args.workdir,
        }
        out["failures"] = [k for k in MUST_BE_ZERO if out[k]]
        if not healthy:
            out["failures"].append("server_healthy_at_end")
        out["notes"] = _notes(self.args.workdir)
        return out


def _say(msg: str) -> None:
    sys.stderr.write(msg + "\n")


def _notes(workdir: str, limit: int = 20) -> list[str]:
    """The first lines the clients logged (wrong bytes, unanswered requests, errors)."""
    lines: list[str] = []
    for path in sorted(glob.glob(os.path.join(workdir, "client-*.log"))):
        with open(path) as f:
            lines += [line.rstrip() for line in f]
    lines.sort(key=lambda s: ("WRONG" not in s, "no answer" not in s and "no result" not in s))
    return lines[:limit]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    p.add_argument("--clients", type=int, default=4, help="engine processes (default 4)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each request, s")
    p.add_argument(
        "--kill-every", type=float, default=4.0, help="SIGKILL a client every N s (0: never)"
    )
    p.add_argument("--clear-every", type=float, default=0.5, help="force-clear L1 every N s")
    p.add_argument("--docs", type=int, default=24, help="shared documents (default 24)")
    p.add_argument("--chunks", type=int, default=6, help="chunks per document (default 6)")
    p.add_argument("--chunk-size", type=int, default=64, help="server --chunk-size (default 64)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="KV shape")
    p.add_argument("--l1-size-gb", type=float, default=0.125)
    p.add_argument("--no-l2", action="store_true", help="no fs L2 tier")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--workdir", default=None, help="logs and the L2 directory (default: a temp dir)"
    )
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.getrandbits(31)
    if args.clients < 1 or args.seconds <= 0 or args.timeout <= 0 or args.chunks < 1:
        p.error("--clients, --seconds, --timeout and --chunks must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="kvhive-soak-")
        args.workdir = tmp
    os.makedirs(args.workdir, exist_ok=True)
    _say(f"soak: {args.seconds:g} s, {args.clients} clients, seed {args.seed}, "
          f"workdir {args.workdir}")  # fmt: skip
    soak = Soak(args)
    try:
        report = soak.run()
    except Exception as exc:  # noqa: BLE001 - harness boundary: report and exit 2
        _say(f"soak: harness failure: {type(exc).__name__}: {exc}")
        _say(soak.server.log_tail(40))
        soak.server.stop()
        return 2
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
