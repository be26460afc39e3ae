"""The engine pattern's floor (:mod:`kvhive.bench.engine_floor`): the block runs it copies
are exactly the request's bytes in object order, and it is measured against a bare echo in
the pattern's own sequence (a real ``kvhive server`` only to register the engine)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvhive.bench.config import SHAPES
from kvhive.bench.engine_floor import (
    block_runs,
    gather_floor,
    measure_floors,
    scatter_floor,
)
from kvhive.bench.engineload import EngineWorkload
from kvhive.bench.kvengine import ShmKVCache
from kvhive.bench.servers import ServerProcess, free_port, subprocess_env

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m", "mla-27L-576D"])
def test_runs_are_the_blocks_bytes_in_object_order(shape: str) -> None:
    kv = ShmKVCache(SHAPES[shape], 40, 16)
    try:
        kv.fill(list(range(40)), seed=5)
        src, dst = [7, 3, 31, 12], [1, 22, 9, 30]
        runs = block_runs(kv, src)
        assert runs.nbytes == SHAPES[shape].chunk_bytes(64)  # 4 blocks of 16 tokens
        buf = np.zeros(runs.nbytes, np.uint8)
        gather_floor(kv, runs, buf)
        idx = kv.blocks(src)
        if SHAPES[shape].mla:  # [B, BS, D]: blocks as they are
            parts = [layer[idx] for layer in kv.layers]
        else:  # [2, B, NH, BS, HS] -> each block token-major: [2, B, BS, NH, HS]
            parts = [layer[idx].transpose(0, 1, 3, 2, 4) for layer in kv.layers]
        want = np.concatenate([np.ascontiguousarray(p).reshape(-1).view(np.uint8)
                               for p in parts])  # fmt: skip
        assert np.array_equal(buf, want)
        assert not kv.blocks_equal(src, dst)
        scatter_floor(kv, buf, block_runs(kv, dst))
        assert kv.blocks_equal(src, dst)
    finally:
        kv.close()


def test_floor_is_measured_against_a_bare_echo(server: ServerProcess) -> None:
    port = free_port()
    echo = subprocess.Popen([sys.executable, "-m", "kvhive.bench.echo", str(port)],
                            env=subprocess_env())  # fmt: skip
    w = EngineWorkload(server.rpc_url, SHAPES["tiny"], cache_chunks=8, block_size=16,
                       model="floor-test", seed=3)  # fmt: skip
    try:
        w.touch_everything()
        res = measure_floors(w, f"tcp://127.0.0.1:{port}", {1: 3, 2: 2})
    finally:
        w.eng.close()
        echo.terminate()
        echo.wait(10)
    chunk = SHAPES["tiny"].chunk_bytes(256)
    for op in ("store", "retrieve"):
        assert set(res[op]) == {"1", "2"}
        for p, f in res[op].items():
            assert f["requests"] == {"1": 3, "2": 2}[p]
            assert 0 < f["rtt_ms_p50"] < f["ms_p50"]  # the copy takes time after the echo
            assert f["copy_ms_p50"] > 0
            assert f["gbs"] == pytest.approx(int(p) * chunk / f["ms_p50"] / 1e6, rel=1e-3)
