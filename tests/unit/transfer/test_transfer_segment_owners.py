"""Who may unlink an engine's segment (issue 10, faults 6 and 7).

kvhive unlinks a segment only when it proved at registration which visible process created
it (named ``lmcache_kv_<pid>_<n>``, mapped by that pid, with its start time), that process
is gone now, and the name still holds the recorded inode.  Real creator processes here.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvhive.transfer.shm import (
    SegmentOwner,
    SegmentReaper,
    ShmMapping,
    cleanup_stale_segments,
    prove_owners,
)
from support.shm import ShmSegment

CREATOR = """
import json, mmap, os, sys, time, _posixshmem
names, maps = [], []
for i in range(int(sys.argv[1])):
    name = "lmcache_kv_%d_%d" % (os.getpid(), i)
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    os.ftruncate(fd, 8192)
    maps.append(mmap.mmap(fd, 8192))
    os.close(fd)
    names.append(name)
print(json.dumps(names), flush=True)
time.sleep(600)
"""


class Creator:
    """A real process that creates ``n`` segments the way the lmcache client names them and
    keeps them mapped until it is killed (it never unlinks them)."""

    def __init__(self, n: int = 2) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CREATOR, str(n)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.names: list[str] = json.loads(self.proc.stdout.readline())
        self.maps = [ShmMapping.open(n, 8192) for n in self.names]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def identities(self) -> list[tuple[str, int, int]]:
        return [(m.name, m.dev, m.ino) for m in self.maps]

    def kill(self, *, wait: bool = True) -> None:
        self.proc.send_signal(signal.SIGKILL)
        if wait:
            self.proc.wait()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.wait()
        for m in self.maps:
            m.close()
        for n in self.names:
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink("/" + n)


@pytest.fixture
def creator() -> Iterator[type[Creator]]:
    made: list[Creator] = []

    class Tracked(Creator):
        def __init__(self, n: int = 2) -> None:
            super().__init__(n)
            made.append(self)

    yield Tracked
    for c in made:
        c.cleanup()


def exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def test_a_visible_creator_mapping_its_segments_is_proven(creator) -> None:
    c = creator(2)
    owners = prove_owners(c.identities())
    assert sorted(owners) == c.names
    for m in c.maps:
        o = owners[m.name]
        assert (o.pid, o.dev, o.ino) == (c.pid, m.dev, m.ino)
        with open(f"/proc/{c.pid}/stat") as f:
            assert o.start_ticks == int(f.read().rsplit(")", 1)[1].split()[19])


def test_nothing_is_proven_without_a_visible_creator_that_maps_the_segment(creator) -> None:
    c = creator(1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    segs = [
        ShmSegment(4096, name=f"lmcache_kv_{c.pid}_99"),  # the named pid does not map it
        ShmSegment(4096, name=f"lmcache_kv_{os.getpid()}_98"),  # ourselves
        ShmSegment(4096, name=f"lmcache_kv_{dead.pid}_97"),  # nobody
        ShmSegment(4096, prefix="kvhive_t_"),  # not a client's name
    ]
    try:
        maps = [ShmMapping.open(s.name, 4096) for s in segs]
        assert prove_owners([(m.name, m.dev, m.ino) for m in maps]) == {}
        for m in maps:
            m.close()
    finally:
        for s in segs:
            s.destroy()


def test_the_reaper_unlinks_only_once_the_creator_is_gone(creator) -> None:
    c = creator(2)
    owners = prove_owners(c.identities())
    reaper = SegmentReaper()
    assert reaper.adopt(owners.values()) == []  # alive: left for it
    assert reaper.watched == 2
    assert reaper.poll() == []
    assert all(exists(n) for n in c.names)
    c.kill()
    assert sorted(reaper.poll()) == c.names
    assert not any(exists(n) for n in c.names)
    assert reaper.watched == 0
    assert reaper.removed == 2
    # our own mappings still work: unlink removes the name, not the pages
    c.maps[0].array[:4] = 7
    assert bytes(c.maps[0].array[:4]) == b"\x07" * 4


def test_a_zombie_creator_is_gone(creator) -> None:
    c = creator(1)
    owners = prove_owners(c.identities())
    c.kill(wait=False)  # not reaped by its parent yet: a zombie with the same start time
    for _ in range(200):
        with open(f"/proc/{c.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        os.sched_yield()
    assert SegmentReaper().adopt(owners.values()) == c.names


def test_a_reused_pid_or_a_replaced_segment_is_respected(creator) -> None:
    c = creator(2)
    owners = prove_owners(c.identities())
    first, second = (owners[n] for n in c.names)
    # The same pid with another start time is another process: the creator is gone.
    reused = SegmentOwner(first.name, first.dev, first.ino, first.pid, first.start_ticks + 1)
    reaper = SegmentReaper()
    assert reaper.adopt([reused]) == [first.name]
    # The name now holds another segment (the client re-created it): never unlinked.
    c.kill()
    _posixshmem.shm_unlink("/" + second.name)
    fresh = ShmSegment(4096, name=second.name)
    try:
        assert reaper.adopt([second]) == []
        assert exists(second.name)
        assert reaper.watched == 0  # forgotten, not watched forever
    finally:
        fresh.destroy()


def test_the_watch_list_is_bounded(creator) -> None:
    c = creator(3)
    reaper = SegmentReaper(limit=2)
    reaper.adopt(prove_owners(c.identities()).values())
    assert reaper.watched == 2
    c.kill()
    assert sorted(reaper.poll()) == c.names[1:]  # the oldest was forgotten: never unlinked
    assert exists(c.names[0])


def test_startup_cleanup_removes_nothing_it_cannot_prove(
    tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture
) -> None:
    """After a restart kvhive holds no records, and a pid that is not visible may belong to
    a live engine in another PID namespace: by default the start-up cleanup only reports."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"lmcache_kv_{dead.pid}_0"
    (tmp_path / name).write_bytes(b"x")  # type: ignore[operator]
    with caplog.at_level(logging.INFO, logger="kvhive.transfer.shm"):
        assert cleanup_stale_segments(shm_dir=str(tmp_path)) == []
        assert cleanup_stale_segments(shm_dir=str(tmp_path), dry_run=True) == []
    assert (tmp_path / name).exists()  # type: ignore[operator]
    assert "another PID namespace" in caplog.text
