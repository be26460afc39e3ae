"""Helpers shared by the transfer tests (imported by name; not a test module)."""

from __future__ import annotations

import _posixshmem
import contextlib
import mmap
import os
import pathlib
import subprocess
import uuid

PROBE_PYTHON = pathlib.Path(
    os.environ.get("KVHIVE_CLIENT_PYTHON") or "/root/.cache/kvhive/venv-probe/bin/python"
)
SRC_DIR = pathlib.Path(__file__).resolve().parents[3] / "src"
HERE = pathlib.Path(__file__).resolve().parent


def maps_of(name: str) -> int:
    """How many mappings of /dev/shm/<name> this process has."""
    needle = f"/dev/shm/{name.lstrip('/')}"
    with open(f"/proc/{os.getpid()}/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(needle))


def run_probe(python: pathlib.Path, script: str, timeout: float = 240) -> str:
    """Run ``script`` (a file next to this one) with ``python``; return its stdout."""
    proc = subprocess.run(
        [str(python), str(HERE / script), str(SRC_DIR)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


class ShmSegment:
    """A POSIX shared-memory segment we create, like a worker does.

    Not ``multiprocessing.shared_memory``: its ``__del__`` raises BufferError
    when a test still holds a numpy view, which is noisy when a test fails.
    ``buf`` is the creator's own mapping (one entry in /proc/self/maps).
    """

    def __init__(self, size: int, name: str | None = None) -> None:
        self.name = name or f"kvhive_t_{uuid.uuid4().hex[:12]}"
        self.size = size
        fd = _posixshmem.shm_open("/" + self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
            self.buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def destroy(self) -> None:
        """Unlink; unmap unless a view is still alive (then it unmaps with the view)."""
        with contextlib.suppress(FileNotFoundError):
            _posixshmem.shm_unlink("/" + self.name)
        with contextlib.suppress(BufferError):
            self.buf.close()
