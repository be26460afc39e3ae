"""The SIGBUS-safe copy helper and PagedKV over a segment its worker truncated (issue 10, 1).

A worker may ``ftruncate`` its segment after registering it; touching a page of our mapping
past the new end raises SIGBUS.  Every copy of an engine page goes through
``kvhive.transfer._safecopy``, which turns that fault into TransferFailed.  The scenarios
that would kill the process without the helper run in a child interpreter, so a regression
fails one test instead of killing the test run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable

import numpy as np
import pytest

from kvhive.errors import RegistrationError, TransferFailed
from kvhive.transfer import paged, safecopy
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.paged import PagedKV
from kvhive.transfer.shm import ShmMapping
from support.descriptors import contiguous_strides
from support.shm import ShmSegment, truncate

Segment = Callable[[int], ShmSegment]
PAGE = os.sysconf("SC_PAGE_SIZE")


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (PYTHONPATH has tests/ for ``support``)."""
    tests = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_the_helper_is_built() -> None:
    assert safecopy.available(), "kvhive.transfer._safecopy is not built (pip install -e .)"


def test_copy_rows_follows_the_plan() -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, 4096, dtype=np.uint8)
    dst = np.zeros(1024, np.uint8)
    offs = np.array([3000, 0, 512, 64], np.int64)
    safecopy.copy_rows(dst, None, src, offs, 256, segment="s")
    want = np.concatenate([src[o : o + 256] for o in offs])
    np.testing.assert_array_equal(dst, want)
    back = np.zeros(4096, np.uint8)
    safecopy.copy_rows(back, offs, dst, None, 256, segment="s")
    for i, o in enumerate(offs):
        np.testing.assert_array_equal(back[o : o + 256], dst[i * 256 : (i + 1) * 256])
    both = np.zeros(4096, np.uint8)
    safecopy.copy_rows(both, offs[::-1].copy(), src, offs, 256, segment="s")
    np.testing.assert_array_equal(both[3000:3256], src[64:320])


@pytest.mark.parametrize(
    ("dst_n", "offs", "row", "err"),
    [
        (1024, np.array([4096 - 255], np.int64), 256, ValueError),  # past the end of src
        (1024, np.array([-1], np.int64), 256, ValueError),
        (100, np.array([0], np.int64), 256, ValueError),  # contiguous side too short
        (1024, np.array([0], np.int32), 256, TypeError),  # not int64
        (1024, np.array([0], np.int64), 0, ValueError),
    ],
)
def test_copy_rows_checks_before_copying(dst_n, offs, row, err) -> None:
    src = np.ones(4096, np.uint8)
    dst = np.zeros(dst_n, np.uint8)
    with pytest.raises(err):
        safecopy.copy_rows(dst, None, src, offs, row, segment="s")
    assert not dst.any()
    with pytest.raises(TypeError):
        safecopy.copy_rows(dst, None, src, None, 16, segment="s")
    with pytest.raises((TypeError, ValueError, BufferError)):
        safecopy.copy_rows(src[::2], None, src, np.zeros(1, np.int64), 16, segment="s")


def test_truncated_mapping_becomes_transfer_failed(shm_segment: Segment) -> None:
    seg = shm_segment(16 * PAGE)
    m = ShmMapping.open(seg.name, 16 * PAGE)
    try:
        out = np.empty(8 * PAGE, np.uint8)
        safecopy.copy_rows(out, None, m.array, np.array([0], np.int64), 8 * PAGE, segment="x")
        truncate(seg.name, 4 * PAGE)
        with pytest.raises(TransferFailed, match="truncated or shrank"):
            safecopy.copy_rows(
                out, None, m.array, np.array([2 * PAGE], np.int64), 8 * PAGE, segment="x"
            )
        out[:] = 0
        with pytest.raises(TransferFailed):  # one page per row: rows 0-3 copied, 4 faults
            safecopy.copy_rows(
                out, None, m.array, np.arange(6, dtype=np.int64) * PAGE, PAGE, segment="x"
            )
        np.testing.assert_array_equal(out[: 4 * PAGE], np.frombuffer(seg.buf, np.uint8, 4 * PAGE))
        with pytest.raises(TransferFailed):  # writes fault the same way
            safecopy.copy_rows(
                m.array, np.array([8 * PAGE], np.int64), out, None, PAGE, segment="x"
            )
        truncate(seg.name, 16 * PAGE)  # grown back: holes read as zeros, no fault
        safecopy.copy_rows(out, None, m.array, np.array([0], np.int64), 8 * PAGE, segment="x")
    finally:
        m.close()


def test_faults_on_several_threads_at_once(shm_segment: Segment) -> None:
    seg = shm_segment(64 * PAGE)
    m = ShmMapping.open(seg.name, 64 * PAGE)
    truncate(seg.name, PAGE)
    errors: list[BaseException] = []

    def worker() -> None:
        out = np.empty(PAGE, np.uint8)
        for i in range(200):
            try:
                off = np.array([PAGE * (1 + i % 60)], np.int64)
                safecopy.copy_rows(out, None, m.array, off, PAGE, segment="x")
            except TransferFailed as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    m.close()
    assert len(errors) == 800


def layer_engine(seg: ShmSegment, nb: int, layers: int = 2) -> PagedKV:
    """A PagedKV whose layers are consecutive views of ``seg`` (NHD [2, NB, BS, NH, HS])."""
    phys = (2, nb, 16, 2, 32)
    n = int(np.prod(phys))
    descs = [
        TensorDesc("bfloat16", phys, contiguous_strides(phys), li * n, seg.name, seg.size)
        for li in range(layers)
    ]
    return PagedKV.from_descriptors(descs, {"kv_layout": "NHD"}, [], 32)


def test_paged_kv_survives_a_truncated_segment(shm_segment: Segment) -> None:
    nb = 64
    seg = shm_segment(2 * 2 * nb * 16 * 2 * 32 * 2)
    kv = layer_engine(seg, nb)
    try:
        out = np.empty(kv.object_nbytes, np.uint8)
        kv.gather([1, 2], out)
        kv.scatter(out, [5, 6])
        truncate(seg.name, seg.size // 4)
        with pytest.raises(TransferFailed):
            kv.gather([60, 61], out)
        with pytest.raises(TransferFailed):
            kv.scatter(out, [60, 61])
        with pytest.raises(TransferFailed):
            kv.checksums(list(range(nb)), 2)
        truncate(seg.name, seg.size)
        kv.gather([1, 2], out)  # the registration keeps working once the pages are back
    finally:
        kv.close()


def test_checksums_read_through_the_helper_and_match_numpy(shm_segment: Segment) -> None:
    """The checksum path now copies through the helper; its bytes are numpy's selection."""
    nb = 8
    seg = shm_segment(2 * 2 * nb * 16 * 2 * 32 * 2)
    kv = layer_engine(seg, nb)
    try:
        ids = [3, 1, 7, 7]
        arr = np.frombuffer(seg.buf, np.uint16).reshape(2, 2, nb, 16, 2, 32)
        want = []
        for s in range(0, 4, 2):
            h = hashlib.md5(usedforsecurity=False)
            for li in range(2):
                sel = arr[li][:, ids[s : s + 2]].astype("<u4") << np.uint32(16)
                h.update(np.ascontiguousarray(sel).tobytes())
            want.append(h.hexdigest())
        assert kv.checksums(ids, 2) == want
    finally:
        kv.close()


def test_no_registration_without_the_helper(
    shm_segment: Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg = shm_segment(2 * 2 * 4 * 16 * 2 * 32 * 2)
    monkeypatch.setattr(safecopy, "_native", None)
    with pytest.raises(RegistrationError, match="native copy helper"):
        layer_engine(seg, 4)


def test_gather_rows_cut_or_not_give_the_same_bytes(
    shm_segment: Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = 16
    seg = shm_segment(2 * 2 * nb * 16 * 2 * 32 * 2)
    outs = []
    for cap in (64, 4096):
        monkeypatch.setattr(paged, "GATHER_ROW_CAP", cap)
        kv = layer_engine(seg, nb)
        out = np.empty(kv.object_nbytes, np.uint8)
        kv.gather([9, 4], out)
        outs.append(out)
        kv.close()
    np.testing.assert_array_equal(outs[0], outs[1])


def test_a_fault_outside_a_guarded_copy_still_kills() -> None:
    """The handler absorbs only faults inside copy_rows: any other SIGBUS keeps its default
    action (the process dies as before), also when faulthandler is enabled."""
    for enable_faulthandler in (False, True):
        proc = run_child(
            f"""
            import faulthandler, mmap, os, _posixshmem
            import numpy as np
            from kvhive.errors import TransferFailed
            from kvhive.transfer import safecopy
            if {enable_faulthandler}:
                faulthandler.enable()
            name = "/kvhive_t_sigbus_%d" % os.getpid()
            fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_RDWR, mode=0o600)
            _posixshmem.shm_unlink(name)
            os.ftruncate(fd, 1 << 16)
            m = mmap.mmap(fd, 1 << 16)
            a = np.frombuffer(m, np.uint8)
            os.ftruncate(fd, 4096)
            out = np.empty(4096, np.uint8)
            try:
                safecopy.copy_rows(out, None, a, np.array([8192], np.int64), 4096, segment="x")
            except TransferFailed:
                print("absorbed", flush=True)
            if {enable_faulthandler}:
                faulthandler.disable()  # gives back SIGBUS's old default action...
                faulthandler.enable()  # ...and installs over it: the next copy re-installs ours
                try:
                    safecopy.copy_rows(out, None, a, np.array([8192], np.int64), 4096, segment="x")
                except TransferFailed:
                    print("absorbed again", flush=True)
            out[:] = a[8192:12288]  # numpy, unguarded: must die
            print("survived", flush=True)
            """
        )
        assert "absorbed" in proc.stdout, proc.stderr
        if enable_faulthandler:
            assert "absorbed again" in proc.stdout, proc.stderr
            assert "Bus error" in proc.stderr  # faulthandler still reports a real fault
        assert "survived" not in proc.stdout
        assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)


def test_a_sigbus_sent_by_someone_is_not_absorbed() -> None:
    """A SIGBUS sent to a copying thread is not a fault of the copy: the default action
    runs (only kernel-raised faults inside a copy are absorbed)."""
    proc = run_child(
        """
        import signal, threading, time
        import numpy as np
        from kvhive.transfer import safecopy
        src = np.ones(1 << 26, np.uint8)
        dst = np.empty_like(src)
        offs = np.arange(0, 1 << 26, 1 << 12, dtype=np.int64)
        def copy():
            while True:
                safecopy.copy_rows(dst, offs, src, offs, 1 << 12, segment="x")
        th = threading.Thread(target=copy, daemon=True)
        th.start()
        time.sleep(0.3)
        signal.pthread_kill(th.ident, signal.SIGBUS)
        time.sleep(2)
        print("survived", flush=True)
        """
    )
    assert "survived" not in proc.stdout
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)
