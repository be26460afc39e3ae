"""Faults 1, 6 and 7 of issue 10 against a real ``kvhive server`` subprocess.

The workers are real processes (``segment_client.py``) that create their KV cache the way
the lmcache 0.5.6 client does -- ``lmcache_kv_<pid>_<n>`` segments -- and talk to the server
over kvhive's own client.

1. A worker truncates its segments: the server survives, answers that worker's store and
   retrieve with their soft failure, and serves another worker byte-exact.
7. SIGKILLed workers' segments are unlinked once the reaper drops them; a live worker's and
   a segment kvhive never recorded stay.
6. A restart keeps the segments of a live worker in another PID namespace (the start-up
   cleanup used to delete them: "segment does not exist" on re-registration).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pidns import SegmentWorker, cleaned_up, invisible_pid, unshare_argv

from kvhive.bench.servers import ServerProcess, subprocess_env
from support.shm import ShmSegment

CLIENT = Path(__file__).with_name("segment_client.py")
LAYERS = 2  # segment_client.LAYERS


class Worker(SegmentWorker):
    """One ``segment_client.py`` process: registered and pinged once constructed."""

    def __init__(self, url: str, *, ns_pid: int = 0, unshare: list[str] | None = None) -> None:
        argv = [sys.executable, str(CLIENT), "--url", url]
        super().__init__(
            argv,
            ns_pid=ns_pid,
            ns_flag=["--ns-pid"],
            unshare=unshare,
            stdin=subprocess.PIPE,
            env=subprocess_env(),
        )
        self.instance_id: int = self.ready["instance_id"]

    def cmd(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    yield from cleaned_up([])


@contextlib.contextmanager
def server(
    tmp_path: Path, *extra: str, name: str = "server", **ports: int
) -> Iterator[ServerProcess]:
    srv = ServerProcess("kvhive", 0.0625, list(extra), log_path=tmp_path / f"{name}.log", **ports)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def post(srv: ServerProcess, path: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(
        srv.http_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_truncating_worker_cannot_crash_the_server(tmp_path: Path, workers) -> None:
    with server(tmp_path) as srv:
        a, b = Worker(srv.rpc_url), Worker(srv.rpc_url)
        workers += [a, b]
        assert a.cmd("store", seed=1, first=0, chunks=2) == {"ok": True}
        assert b.cmd("store", seed=2, first=0, chunks=2) == {"ok": True}
        assert a.cmd("truncate", nbytes=0) == {"ok": True}

        assert a.cmd("store", seed=3, first=2, chunks=1) == {"ok": False}
        assert a.cmd("retrieve", seed=1, first=2, chunks=2) == {"ok": False, "hit": 2}
        body = {"block_ids": [1, 2], "chunk_size": 2, "instance_id": a.instance_id}
        assert post(srv, "/cache/checksums", body) == 400
        assert srv.alive(), srv.log_tail()
        assert srv.healthy(), srv.log_tail()

        assert b.cmd("retrieve", seed=2, first=2, chunks=2) == {"ok": True, "hit": 2}
        assert b.cmd("equal", a=0, b=2, chunks=2) == {"equal": True}
        assert b.cmd("store", seed=4, first=3, chunks=1) == {"ok": True}


def test_killed_workers_segments_are_freed_by_the_reaper(tmp_path: Path, workers) -> None:
    reap = ["--worker-reap-timeout-seconds", "30", "--worker-registration-grace-seconds", "30"]
    with server(tmp_path, *reap) as srv:
        workers += [Worker(srv.rpc_url) for _ in range(4)]
        *doomed, live = workers
        never_recorded = ShmSegment(4096, name=f"lmcache_kv_{doomed[0].pid}_99")
        try:
            for i, w in enumerate(workers):
                assert w.cmd("store", seed=10 + i, first=0, chunks=1) == {"ok": True}
            for w in doomed:
                w.kill()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and any(any(w.exists()) for w in doomed):
                assert live.cmd("ping") == {"ok": True}
                time.sleep(1.0)
            assert [w.exists() for w in doomed] == [[False] * LAYERS] * len(doomed)
            assert all(live.exists())
            assert os.path.exists(f"/dev/shm/{never_recorded.name}")
            liveness = srv.status()["worker_liveness"]
            assert liveness["reaped"] == len(doomed)
            assert liveness["segments_unlinked"] == len(doomed) * LAYERS
            assert live.cmd("retrieve", seed=10 + len(doomed), first=1, chunks=1)["ok"]
            assert live.cmd("equal", a=0, b=1, chunks=1) == {"equal": True}
        finally:
            never_recorded.destroy()


def test_a_restart_keeps_the_segments_of_a_worker_in_another_pid_namespace(
    tmp_path: Path, workers
) -> None:
    unshare = unshare_argv()
    with server(tmp_path, name="first") as srv:
        hidden = Worker(srv.rpc_url, ns_pid=invisible_pid(), unshare=unshare)
        workers.append(hidden)
        assert not os.path.exists(f"/proc/{hidden.pid}")  # looks dead from here
        assert hidden.cmd("store", seed=7, first=0, chunks=1) == {"ok": True}
        ports = {"rpc_port": srv.rpc_port, "http_port": srv.http_port}
    assert all(hidden.exists())  # the shutdown left them
    with server(tmp_path, name="second", **ports) as srv:
        assert all(hidden.exists()), srv.log_tail()  # the start-up cleanup left them
        assert hidden.cmd("register") == {"ok": True}
        assert hidden.cmd("store", seed=8, first=0, chunks=1) == {"ok": True}
        assert hidden.cmd("retrieve", seed=8, first=1, chunks=1) == {"ok": True, "hit": 1}
        assert hidden.cmd("equal", a=0, b=1, chunks=1) == {"equal": True}
