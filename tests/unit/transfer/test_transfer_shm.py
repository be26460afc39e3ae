"""Shared-memory mappings: open/map, refcounting, unmapping, views, stale cleanup."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import uuid
from collections.abc import Callable

import numpy as np
import pytest
from transfer_testlib import maps_of

from kvhive.errors import RegistrationError
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.shm import (
    SegmentTable,
    ShmMapping,
    cleanup_stale_segments,
    tensor_view,
    uint_dtype,
)
from support.paths import env_with_src
from support.shm import ShmSegment

Segment = Callable[[int], ShmSegment]


def ours(seg: ShmSegment) -> int:
    """Our mappings of ``seg``, not counting the creator's own (SharedMemory maps it)."""
    return maps_of(seg.name) - 1


def test_open_maps_read_write(shm_segment: Segment) -> None:
    seg = shm_segment(4096)
    m = ShmMapping.open("/" + seg.name, 4096)
    assert ours(seg) == 1
    m.array[:4] = [1, 2, 3, 4]
    assert bytes(seg.buf[:4]) == b"\x01\x02\x03\x04"  # same pages as the creator
    seg.buf[10] = 99
    assert m.array[10] == 99
    m.close()
    assert m.closed and ours(seg) == 0
    m.close()  # idempotent


def test_open_missing_segment() -> None:
    with pytest.raises(RegistrationError, match="does not exist"):
        ShmMapping.open(f"kvhive_missing_{uuid.uuid4().hex}", 16)


def test_open_refuses_a_size_beyond_the_segment(shm_segment: Segment) -> None:
    seg = shm_segment(4096)
    # Mapping past the end would SIGBUS on first touch; refuse up front.
    with pytest.raises(RegistrationError, match="has 4096 bytes"):
        ShmMapping.open(seg.name, 8192)
    with pytest.raises(RegistrationError, match="cannot map"):
        ShmMapping.open(seg.name, 0)
    assert ours(seg) == 0


def test_partial_mapping(shm_segment: Segment) -> None:
    seg = shm_segment(8192)
    m = ShmMapping.open(seg.name, 100)
    assert m.array.size == 100
    m.close()


def test_table_maps_each_segment_once_and_refcounts(shm_segment: Segment) -> None:
    a, b = shm_segment(4096), shm_segment(4096)
    table = SegmentTable()
    ma = table.acquire(a.name, 4096)
    assert table.acquire("/" + a.name, 2048) is ma  # sibling view, smaller span: shared
    table.acquire(b.name, 4096)
    assert ours(a) == 1 and ours(b) == 1 and len(table) == 2
    assert table.get(a.name) is ma and table.names() == sorted([a.name, b.name])
    with pytest.raises(RegistrationError, match="declared with 8192"):
        table.acquire(a.name, 8192)
    table.release(a.name)
    assert ours(a) == 1  # one reference left
    table.release(a.name)
    assert ours(a) == 0 and ma.closed
    with pytest.raises(RegistrationError, match="not mapped"):
        table.get(a.name)
    table.release(a.name)  # unknown: ignored
    table.close()
    assert ours(b) == 0 and len(table) == 0
    table.close()


def test_close_with_a_live_view_defers_the_unmap(shm_segment: Segment) -> None:
    seg = shm_segment(4096)
    m = ShmMapping.open(seg.name, 4096)
    view = m.array[100:200]
    m.close()  # must not raise: the view keeps the pages until it dies
    assert m.closed and ours(seg) == 1
    view[0] = 7  # still valid memory
    del view
    gc.collect()
    assert ours(seg) == 0


def test_uint_dtype() -> None:
    assert uint_dtype(2) == np.dtype("<u2") and uint_dtype(1) == np.uint8
    assert uint_dtype(16).itemsize == 16


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "uint8", "float64"])
def test_tensor_view_matches_strided_layout(shm_segment: Segment, dtype: str) -> None:
    seg = shm_segment(8192)
    isz = TensorDesc(dtype, (1,), (1,), 0, seg.name, 8192).itemsize
    total = 8192 // isz
    flat = np.frombuffer(seg.buf, uint_dtype(isz))[:total]
    # A permuted, offset view: logical [3, 4, 5] over physical [4, 3, 5] from element 7.
    d = TensorDesc(dtype, (3, 4, 5), (5, 15, 1), 7, seg.name, 8192)
    m = ShmMapping.open(seg.name, 8192)
    v = tensor_view(m, d)
    expect = flat[7 : 7 + 60].reshape(4, 3, 5).transpose(1, 0, 2)
    assert v.shape == (3, 4, 5) and v.dtype == uint_dtype(isz)
    assert np.array_equal(v, expect)
    v[1, 2, 3] = 42
    assert expect[1, 2, 3] == 42  # writes reach the segment
    del v, expect, flat
    m.close()


def test_tensor_view_checks(shm_segment: Segment) -> None:
    seg = shm_segment(4096)
    m = ShmMapping.open(seg.name, 1024)
    with pytest.raises(RegistrationError, match="beyond"):
        tensor_view(m, TensorDesc("float32", (512,), (1,), 0, seg.name, 4096))
    with pytest.raises(RegistrationError, match="built on segment"):
        tensor_view(m, TensorDesc("float32", (4,), (1,), 0, "other", 64))
    empty = tensor_view(m, TensorDesc("float32", (0, 4), (4, 1), 0, "", 0))
    assert empty.shape == (0, 4)
    m.close()
    with pytest.raises(RegistrationError, match="closed"):
        tensor_view(m, TensorDesc("float32", (4,), (1,), 0, seg.name, 1024))


def test_attach_does_not_involve_the_resource_tracker(shm_segment: Segment) -> None:
    """A process that only attaches must neither unlink nor warn at exit."""
    seg = shm_segment(4096)
    code = (
        "import sys\n"
        "from kvhive.transfer.shm import ShmMapping\n"
        "m = ShmMapping.open(sys.argv[1], 4096); m.array[0] = 5\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", code, seg.name],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_with_src(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "resource_tracker" not in proc.stderr and "leaked" not in proc.stderr
    assert os.path.exists(f"/dev/shm/{seg.name}")  # still there for its owner
    assert seg.buf[0] == 5


# The pid-visibility rule runs only when the caller asserts one shared PID namespace
# (test_transfer_segment_owners.py: by default nothing is removed).
ONE_NS = {"assume_shared_pid_namespace": True}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_stale_segments_in_a_directory(tmp_path: os.PathLike[str]) -> None:
    dead, live = _dead_pid(), os.getppid()
    names = {
        f"lmcache_kv_{dead}_0": True,  # creator gone -> removed
        f"lmcache_kv_{dead}_17": True,
        f"lmcache_kv_{live}_0": False,  # creator alive
        f"lmcache_kv_{os.getpid()}_0": False,  # ourselves
        f"lmcache_kv_{dead}_x": False,  # not the pattern
        f"lmcache_kv_{dead}": False,
        f"lmcache_l1_pool_{dead}_0": False,  # other prefix
        f"xlmcache_kv_{dead}_0": False,
        "lmcache_kv_0_0": False,  # pid 0 is never "dead"
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")  # type: ignore[operator]
    kept = f"lmcache_kv_{dead}_5"
    (tmp_path / kept).write_bytes(b"x")  # type: ignore[operator]
    (tmp_path / f"lmcache_kv_{dead}_9").mkdir()  # type: ignore[operator]  # not a file

    want = sorted(n for n, gone in names.items() if gone)
    assert (
        cleanup_stale_segments(shm_dir=str(tmp_path), keep={kept}, dry_run=True, **ONE_NS) == want
    )
    assert all((tmp_path / n).exists() for n in names)  # type: ignore[operator]
    assert cleanup_stale_segments(shm_dir=str(tmp_path), keep={kept}, **ONE_NS) == want
    for n, gone in names.items():
        assert (tmp_path / n).exists() != gone  # type: ignore[operator]
    assert (tmp_path / kept).exists()  # type: ignore[operator]
    assert cleanup_stale_segments(shm_dir=str(tmp_path), keep={kept}, **ONE_NS) == []


def test_cleanup_missing_directory(tmp_path: os.PathLike[str]) -> None:
    assert cleanup_stale_segments(shm_dir=str(tmp_path / "nope"), **ONE_NS) == []  # type: ignore[operator]


def test_cleanup_real_posix_segments() -> None:
    prefix = f"kvhivetest_{uuid.uuid4().hex[:8]}_"
    stale = ShmSegment(64, name=f"{prefix}{_dead_pid()}_0")
    alive = ShmSegment(64, name=f"{prefix}{os.getppid()}_1")
    try:
        assert cleanup_stale_segments(prefix, **ONE_NS) == [stale.name]
        assert not os.path.exists(f"/dev/shm/{stale.name}")
        assert os.path.exists(f"/dev/shm/{alive.name}")
    finally:
        stale.destroy()
        alive.destroy()
