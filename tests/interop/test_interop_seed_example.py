"""The seed's full example command line runs as written (kvhive only): nixl_store POSIX as the
only L2 tier under skip_l1, the real lmcache 0.5.6 client storing and loading through it,
Prometheus metrics on the example's port and OTLP spans to the example's endpoint.

The whole run happens in a private network namespace (``unshare -n``, root): the example's
fixed ports are then free and ``--host 0.0.0.0`` binds nothing outside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvhive.bench.servers import subprocess_env

pytestmark = pytest.mark.interop
HERE = Path(__file__).resolve().parent


def test_the_seed_full_example_runs_verbatim(target: str, client_python: str,
                                             tmp_path: Path) -> None:  # fmt: skip
    if target != "kvhive":
        pytest.skip("the example's nixl_store tier needs NIXL in the server's environment")
    pytest.importorskip("nixl_cu12._api", reason="pip install --no-deps nixl-cu12==1.5.1")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private network namespace")
    script = f"ip link set lo up && exec {sys.executable} {HERE / 'seed_example_run.py'} " \
             f"--workdir {tmp_path} --client-python {client_python}"  # fmt: skip
    proc = subprocess.run(["unshare", "-n", "--", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300, env=subprocess_env(), check=False)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"
    res = json.loads(lines[-1][len("RESULT ") :])
    context = f"server log:\n{res['log_tail']}\nclient: {res['client']}"

    assert "--host" in res["argv"] and res["argv"][res["argv"].index("--host") + 1] == "0.0.0.0"
    client = res["client"]
    assert client["rc"] == 0, context
    assert client["chunk_size"] == 512 and client["store_ok"] is True, context
    assert client["l1_objects_after_store"] == 0, context  # skip_l1 freed L1
    assert client["l1_objects_before_lookup"] == 0
    assert client["hit_chunks"] == 2 and client["retrieve_ok"] is True, context
    assert client["bytes_equal"] is True, context
    (adapter,) = res["l2"]
    assert adapter["stored"] == 2 and adapter["loaded"] == 2, adapter
    # The example's pool: 64 files of one 4 KiB page each (file_size defaults to the alignment).
    assert len(res["pool_files"]) == 64 and {size for _, size in res["pool_files"]} == {4096}
    # /metrics on the example's --prometheus-port: both chunks were found in L2
    assert re.search(r"^lmcache_mp_lookup_hit_l2_keys_total\{[^}]*\} 2\.0$", res["metrics"],
                     re.MULTILINE), res["metrics"][:2000]  # fmt: skip
    assert {"request", "mp.store", "mp.retrieve"} <= set(res["spans"]), res["spans"]
    assert res["exit_code"] == 0, context
    # --l1-init-size-gb 20 of a lazy arena is populated only ahead of use, not at start.
    assert res["rss_after_start_mib"] < 4096, res["rss_after_start_mib"]
