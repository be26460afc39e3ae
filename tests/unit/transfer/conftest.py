"""Fixtures for the transfer tests: real POSIX shared-memory segments."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from transfer_testlib import PROBE_PYTHON

from support.shm import ShmSegment


@pytest.fixture
def shm_segment() -> Iterator[Callable[[int], ShmSegment]]:
    """Factory for segments filled with random bytes; all unlinked afterwards."""
    made: list[ShmSegment] = []
    rng = np.random.default_rng(1234)

    def make(nbytes: int) -> ShmSegment:
        seg = ShmSegment(nbytes)
        made.append(seg)
        return seg.fill_random(rng)

    yield make
    for seg in made:
        seg.destroy()


@pytest.fixture
def probe_python() -> pathlib.Path:
    """The interpreter of the venv with torch and the real lmcache 0.5.6 client."""
    if not PROBE_PYTHON.exists():
        pytest.skip(f"{PROBE_PYTHON} not present (torch + lmcache reference venv)")
    return PROBE_PYTHON
