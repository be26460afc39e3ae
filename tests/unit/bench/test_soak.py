"""``benchmarks/soak.py`` for 20 s: a real ``kvhive server`` under random valid and hostile
traffic, SIGKILLed clients and force-clears must give no wrong bytes, no unanswered request
and no server crash (issue 10).  A stress run kept short enough for CI (~35 s here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO

pytestmark = pytest.mark.timeout(240)

SOAK = REPO / "benchmarks" / "soak.py"


def test_soak_20s_has_no_wrong_bytes_no_unanswered_requests_no_crash(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(SOAK), "--seconds", "20", "--clients", "3", "--kill-every", "3",
            "--clear-every", "0.4", "--workdir", str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=200, check=False)
    assert out.exists(), f"no report (exit {proc.returncode})\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    detail = json.dumps({k: report[k] for k in ("failures", "notes", "ops")}, indent=1)
    assert report["wrong_bytes"] == 0 and report["wrong_chunks"] == 0, detail
    assert report["unanswered"] == 0, detail
    assert report["server_crashes"] == 0, detail
    assert report["server_healthy_at_end"], detail
    ops = report["ops"]
    # the run really did the work it reports on
    assert ops["verified_chunks"] > 0 and ops["stores_ok"] > 0, detail
    assert ops["invalid_answered"] > 0, detail
    # every hostile request was answered, but for those of clients killed mid-request
    assert ops["invalid_sent"] - ops["invalid_answered"] <= report["clients_killed"], detail
    assert report["clients_killed"] >= 3 and report["clears_protocol"] + report["clears_http"] > 10
    assert proc.returncode == 0, proc.stderr[-4000:]
