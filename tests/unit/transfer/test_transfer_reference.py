"""Byte-for-byte agreement with the real lmcache 0.5.6 client and CPU server code.

Runs ``ref_paged_probe.py`` in the torch venv: the 0.5.6 client wraps vLLM-like
KV tensors (so the descriptors are exactly what a worker sends), the reference
``CPUCacheContext`` and block-transfer kernels copy chunks, and the reference
``/cache/checksums`` helper hashes blocks; PagedKV must produce identical bytes.
"""

from __future__ import annotations

import pathlib

from transfer_testlib import run_probe


def test_paged_kv_matches_the_reference(probe_python: pathlib.Path) -> None:
    out = run_probe(probe_python, "ref_paged_probe.py")
    lines = [ln for ln in out.splitlines() if ln.startswith(("OK", "FAIL"))]
    assert len(lines) >= 10 and all(ln.startswith("OK") for ln in lines), out
    assert out.rstrip().endswith("ALL OK"), out
    # What the 0.5.6 client sends for vLLM's CPU backend (>= 0.26): per-layer
    # [NB, NH, BS, 2*HS], contiguous, its own segment, kv_layout HND.
    cpu = next(ln for ln in lines if "vLLM CPU fused HND" in ln)
    assert "NL_X_NB_NH_BS_CS" in cpu and "stride=[48, 24, 6, 1] offset=0" in cpu
