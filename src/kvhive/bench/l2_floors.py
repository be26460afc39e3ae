"""Floors of the ``l2`` bench section: what the medium or service does for 32 MiB without
kvhive, measured beside each adapter (movers of :mod:`kvhive.bench.l2_measure`).

* :class:`DdMover` -- file tiers: ``dd`` writing a fresh file in the tier's own directory and
  reading it back, with ``oflag=direct``/``iflag=direct`` for O_DIRECT tiers and no
  ``conv=fsync`` (no adapter fsyncs an object).  The time is dd's own (its final statistics
  line: the copy, without process start).  ``bs`` is 4 MiB by default: dd's buffer is
  faulted in on its first use, so ``bs=32M`` would put 8,192 page faults into the floor,
  while the adapters' buffers (the L1) are mapped already.
* :class:`MemcpyMover` -- memory tiers: ``np.copyto`` of the object into (write) and out of
  (read) a mapping of a scratch file in the tier's directory (dax on tmpfs), or anonymous
  memory (mock); pages touched before timing.
* :class:`RedisMover`, :class:`S3Mover` -- a raw redis-py ``SET``/``GET`` and a raw awscrt
  ``PutObject``/``GetObject`` of the same bytes against the same server.
* :class:`MooncakeMover` -- raw ``MooncakeDistributedStore.put_from``/``get_into``.

Cold reads (file tiers with the page cache): :func:`drop_cache` writes back and drops the
pages of this bench's own files only (``fsync`` + ``posix_fadvise(DONTNEED)``); the system's
page cache is never dropped.
"""

from __future__ import annotations

import io
import mmap
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from kvhive.bench.l2_measure import OP_TIMEOUT_S, Arena

_DD_TIME = re.compile(r"copied, ([0-9.eE+-]+) s")


def drop_cache(path: str | Path) -> None:
    """Write back and drop the cached pages of ``path`` (a file, or every regular file under
    a directory): the next read comes from the device.  Only these files are touched."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:  # removed meanwhile (a rename in flight)
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class DdMover:
    """``dd`` on files ``dd-<i>.bin`` in ``directory`` (module docstring); each call returns
    dd's own elapsed seconds.  ``direct``: ``oflag=direct`` / ``iflag=direct``."""

    def __init__(self, directory: str | Path, nbytes: int, *, direct: bool, bs: int) -> None:
        self.dir = Path(directory)
        self.nbytes, self.direct = nbytes, direct
        self.bs = min(bs, nbytes)
        if nbytes % self.bs:
            raise ValueError(f"dd bs {self.bs} must divide the object size {nbytes}")

    @property
    def what(self) -> str:
        flags = " oflag/iflag=direct" if self.direct else ""
        return f"dd bs={self.bs >> 20}M{flags}"

    def _path(self, i: int) -> Path:
        return self.dir / f"dd-{i}.bin"

    def _dd(self, *args: str) -> float:
        argv = ["dd", *args, f"bs={self.bs}", f"count={self.nbytes // self.bs}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=OP_TIMEOUT_S,
                              env={**os.environ, "LC_ALL": "C"}, check=False)  # fmt: skip
        m = _DD_TIME.search(done.stderr)
        if done.returncode or m is None:
            raise RuntimeError(f"{' '.join(argv)}: rc {done.returncode}: {done.stderr.strip()}")
        return float(m.group(1))

    def write(self, i: int) -> float:
        self._path(i).unlink(missing_ok=True)
        flags = ["oflag=direct"] if self.direct else []
        return self._dd("if=/dev/zero", f"of={self._path(i)}", *flags)

    def read(self, i: int) -> float:
        flags = ["iflag=direct"] if self.direct else []
        return self._dd(f"if={self._path(i)}", "of=/dev/null", *flags)

    def read_cold(self, i: int) -> float | None:
        if self.direct:
            return None
        drop_cache(self._path(i))
        return self.read(i)

    def close(self) -> None:
        for f in self.dir.glob("dd-*.bin"):
            f.unlink(missing_ok=True)


class MemcpyMover:
    """``np.copyto`` of ``arena.src(i)`` into a two-slot store and back into ``arena.dst(i)``;
    the store maps a scratch file in ``directory`` (None: anonymous memory)."""

    what = "memcpy"

    def __init__(self, arena: Arena, directory: str | Path | None = None) -> None:
        self.arena = arena
        n = 2 * arena.nbytes
        self._path: Path | None = None
        if directory is None:
            self._map = mmap.mmap(-1, n)
        else:
            self._path = Path(directory) / f"memcpy-floor-{uuid.uuid4().hex[:8]}.img"
            with open(self._path, "w+b") as f:
                f.truncate(n)
                self._map = mmap.mmap(f.fileno(), n)
        self._store: np.ndarray | None = np.frombuffer(self._map, np.uint8)
        self._store[:] = 1  # every page in before timing

    def _slot(self, i: int) -> np.ndarray:
        assert self._store is not None
        n = self.arena.nbytes
        return self._store[(i % 2) * n : (i % 2 + 1) * n]

    def write(self, i: int) -> float:
        dst, src = self._slot(i), self.arena.src(i)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t0

    def read(self, i: int) -> float:
        dst, src = self.arena.dst(i), self._slot(i)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t0

    def read_cold(self, i: int) -> float | None:
        return None

    def close(self) -> None:
        self._store = None
        self._map.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)


class RedisMover:
    """redis-py ``SET key <bytes>`` / ``GET key`` (the raw value, no framing, no copy into
    the destination: the client's own floor) on ``host:port``."""

    what = "redis-py SET/GET"

    def __init__(self, arena: Arena, host: str, port: int) -> None:
        import redis

        self.arena = arena
        self.client = redis.Redis(host=host, port=port, socket_timeout=OP_TIMEOUT_S)
        self._tag = uuid.uuid4().hex[:8]

    def _key(self, i: int) -> str:
        return f"kvhive-bench-floor-{self._tag}-{i}"

    def write(self, i: int) -> float:
        view = self.arena.src(i).data.cast("B")
        t0 = time.perf_counter()
        self.client.set(self._key(i), view)
        return time.perf_counter() - t0

    def read(self, i: int) -> float:
        t0 = time.perf_counter()
        value = self.client.get(self._key(i))
        dt = time.perf_counter() - t0
        if not isinstance(value, bytes) or len(value) != self.arena.nbytes:
            raise RuntimeError(f"GET {self._key(i)} returned {type(value).__name__}")
        return dt

    def read_cold(self, i: int) -> float | None:
        return None

    def close(self) -> None:
        try:
            self.client.delete(*[f"kvhive-bench-floor-{self._tag}-{i}" for i in range(64)])
        finally:
            self.client.close()


class _ViewReader(io.RawIOBase):
    """A read-only stream over one buffer (no copy of the payload to build the request)."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._view.nbytes - self._pos)
        buf[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


class S3Mover:
    """awscrt ``S3Client`` ``PutObject`` / ``GetObject`` (body copied into the destination as
    it arrives) on a path-style ``http://host:port/bucket`` endpoint, static credentials."""

    what = "awscrt PutObject/GetObject"

    def __init__(self, arena: Arena, endpoint: str, region: str = "us-east-1") -> None:
        from awscrt import auth, s3
        from awscrt import io as crt_io

        self.arena = arena
        rest = endpoint.split("://", 1)[-1]
        self.host, _, bucket = rest.partition("/")
        self.prefix = f"/{bucket.strip('/')}"
        elg = crt_io.EventLoopGroup(2)
        bootstrap = crt_io.ClientBootstrap(elg, crt_io.DefaultHostResolver(elg))
        self.creds = auth.AwsCredentialsProvider.new_static("test", "test")
        self._s3 = s3
        self.client = s3.S3Client(bootstrap=bootstrap, region=region,
                                  credential_provider=self.creds,
                                  tls_mode=s3.S3RequestTlsMode.DISABLED)  # fmt: skip
        self._tag = uuid.uuid4().hex[:8]

    def _send(self, method: str, i: int, **kw: Any) -> float:
        from awscrt.http import HttpHeaders, HttpRequest

        s3 = self._s3
        headers = [("Host", self.host)]
        body = kw.pop("body", None)
        if body is not None:
            headers += [("Content-Length", str(self.arena.nbytes)),
                        ("Content-Type", "application/octet-stream")]  # fmt: skip
        kind = s3.S3RequestType.PUT_OBJECT if method == "PUT" else s3.S3RequestType.GET_OBJECT
        path = f"{self.prefix}/kvhive-bench-floor-{self._tag}-{i}"
        t0 = time.perf_counter()
        req = self.client.make_request(
            type=kind, request=HttpRequest(method, path, HttpHeaders(headers), body_stream=body),
            credential_provider=self.creds, **kw,
        )  # fmt: skip
        req.finished_future.result(OP_TIMEOUT_S)
        return time.perf_counter() - t0

    def write(self, i: int) -> float:
        return self._send("PUT", i, body=_ViewReader(self.arena.src(i).data.cast("B")))

    def read(self, i: int) -> float:
        dst = self.arena.dst(i).data.cast("B")
        got = [0]
        lock = threading.Lock()

        def on_body(chunk: Any, offset: int, **_: Any) -> None:
            data = memoryview(chunk).cast("B")
            dst[offset : offset + data.nbytes] = data
            with lock:
                got[0] += data.nbytes

        dt = self._send("GET", i, on_body=on_body)
        if got[0] != self.arena.nbytes:
            raise RuntimeError(f"GetObject returned {got[0]} bytes")
        return dt

    def read_cold(self, i: int) -> float | None:
        return None

    def close(self) -> None:
        return None


class MooncakeMover:
    """``MooncakeDistributedStore.put_from`` / ``get_into`` (raw pointers into the arena) on
    its own client of the master at ``setup['master_server_addr']``."""

    what = "MooncakeDistributedStore put_from/get_into"

    def __init__(self, arena: Arena, setup: dict[str, str]) -> None:
        from mooncake.store import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
            MooncakeDistributedStore,
        )

        self.arena = arena
        self.store = MooncakeDistributedStore()
        rc = self.store.setup(setup)
        if rc != 0:
            raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")
        self._tag = uuid.uuid4().hex[:8]

    def _ptr(self, a: np.ndarray) -> int:
        return int(a.ctypes.data)

    def write(self, i: int) -> float:
        src = self.arena.src(i)
        t0 = time.perf_counter()
        rc = self.store.put_from(f"floor-{self._tag}-{i}", self._ptr(src), src.nbytes)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"put_from returned {rc}")
        return dt

    def read(self, i: int) -> float:
        dst = self.arena.dst(i)
        t0 = time.perf_counter()
        n = self.store.get_into(f"floor-{self._tag}-{i}", self._ptr(dst), dst.nbytes)
        dt = time.perf_counter() - t0
        if n != dst.nbytes:
            raise RuntimeError(f"get_into returned {n}")
        return dt

    def read_cold(self, i: int) -> float | None:
        return None

    def close(self) -> None:
        self.store.close()
