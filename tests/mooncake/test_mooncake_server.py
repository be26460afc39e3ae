"""A ``kvhive server`` subprocess whose only L2 tier is ``mooncake_store``, driven by the real
lmcache 0.5.6 client (the interop driver ``tests/interop/drivers/l2.py``)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mc_testlib import Master, client_config

from kvhive.bench.servers import ServerProcess, subprocess_env
from support.venvs import locate_venv_python, unavailable

REPO = Path(__file__).resolve().parents[2]
DRIVERS = REPO / "tests" / "interop" / "drivers"
RESULT_MARK = "@@KVHIVE_INTEROP_RESULT@@ "
CHUNKS = 4

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def client_python() -> str:
    path, reason = locate_venv_python(
        "KVHIVE_CLIENT_PYTHON", REPO / "scripts" / "setup_client_venv.sh", "lmcache client"
    )
    if path is None:
        unavailable(reason)
    return str(path)


@pytest.fixture
def start_server(tmp_path: Path, master: Master) -> Iterator[Any]:
    """``start_server()``: ``kvhive server`` with mooncake_store as its only tier, skip_l1."""
    servers: list[ServerProcess] = []
    tier = json.dumps({"type": "mooncake_store", **client_config(master.addr)})

    def start() -> ServerProcess:
        extra = ["--l2-adapter", tier, "--l2-store-policy", "skip_l1", "--eviction-policy", "noop"]
        server = ServerProcess(
            "kvhive", 0.1, extra, log_path=tmp_path / f"server-{len(servers)}.log"
        )
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def drive(client_python: str, server: ServerProcess, *extra: str) -> dict[str, Any]:
    argv = [client_python, str(DRIVERS / "l2.py"), "--url", server.rpc_url, "--http",
            server.http_url, "--chunks", str(CHUNKS), *extra]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=str(DRIVERS),
                          env=subprocess_env(), stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"driver failed (rc={proc.returncode})\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}\n--- server ---\n{server.log_tail()}", pytrace=False)  # fmt: skip
    return dict(json.loads(lines[-1][len(RESULT_MARK) :]))


def test_skip_l1_chunks_come_back_from_mooncake(client_python: str, start_server: Any) -> None:
    server = start_server()
    res = drive(client_python, server, "--expect-l1-freed", "--no-clear")
    assert res["store_ok"] is True
    assert res["l1_objects_after_store"] == 0  # skip_l1: only in Mooncake now
    assert res["l2_stored"] == [CHUNKS]
    assert res["l1_objects_before_lookup"] == 0
    assert res["hit_chunks"] == CHUNKS  # the lookup prefetched them back from Mooncake
    assert res["retrieve_ok"] is True and res["load_errors"] == []
    assert res["bytes_equal"] is True
    assert res["l2_loaded"] == [CHUNKS]
    assert res["read_locked_after_session"] == 0


def test_a_restarted_server_finds_none_of_its_objects(
    client_python: str, start_server: Any
) -> None:
    """Its own objects lived in its own segment, which went away with it (durable: false)."""
    first = start_server()
    assert drive(client_python, first, "--phase", "store", "--expect-l1-freed")["store_ok"]
    first.stop()
    second = start_server()
    res = drive(client_python, second, "--phase", "load", "--no-clear")
    assert res["hit_chunks"] == 0
    status = json.loads(_get(second.http_url + "/status"))
    (tier,) = status["l2"]["adapters"]
    assert tier["type"] == "mooncake_store" and tier["durable"] is False
    assert tier["adapter"]["is_healthy"] is True


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def test_a_cascade_of_fs_nixl_and_mooncake(client_python: str, master: Master,
                                           tmp_path: Path) -> None:  # fmt: skip
    """fs, nixl_store_dynamic (real NIXL) and mooncake_store in one server: every chunk is
    written behind to all three; a lookup loads from the lowest-index holder; objects removed
    behind a tier's back are one counted miss that repairs its index, then the next tier
    serves."""
    pytest.importorskip("nixl_cu12._api", reason="pip install --no-deps nixl-cu12==1.5.1")
    fs, nixl = tmp_path / "fs", tmp_path / "nixl"
    tiers = [
        {"type": "fs", "base_path": str(fs)},
        {"type": "nixl_store_dynamic", "backend": "POSIX", "backend_params": {
            "file_path": str(nixl), "use_direct_io": "false", "max_capacity_gb": "1"}},
        {"type": "mooncake_store", **client_config(master.addr)},
    ]  # fmt: skip
    extra = [arg for tier in tiers for arg in ("--l2-adapter", json.dumps(tier))]
    server = ServerProcess("kvhive", 0.1, extra, log_path=tmp_path / "server.log")
    server.start()
    try:
        assert drive(client_python, server, "--phase", "store")["l2_stored"] == [CHUNKS] * 3
        res = drive(client_python, server, "--phase", "load")
        assert res["hit_chunks"] == CHUNKS and res["bytes_equal"] is True
        assert res["l2_loaded"] == [CHUNKS, 0, 0]  # from fs, the first holder
        for f in fs.glob("*.data"):
            f.unlink()
        res = drive(client_python, server, "--phase", "load")
        assert res["hit_chunks"] == CHUNKS and res["bytes_equal"] is True
        assert res["l2_loaded"] == [CHUNKS, CHUNKS, 0]  # fs asks its disk: NIXL serves
        for f in nixl.rglob("*.bin"):
            f.unlink()
        res = drive(client_python, server, "--phase", "load")  # NIXL's index still has them
        assert res["hit_chunks"] == 0 and res["l2_loaded"] == [CHUNKS, CHUNKS, 0]
        res = drive(client_python, server, "--phase", "load")  # ... not any more: Mooncake
        assert res["hit_chunks"] == CHUNKS and res["bytes_equal"] is True
        assert res["l2_loaded"] == [CHUNKS, CHUNKS, CHUNKS]
        fs_st, nixl_st, mc_st = server.status()["l2"]["adapters"]
        for st in (fs_st, nixl_st):  # the files removed behind their backs no longer count
            assert (st["objects"], st["vanished"]) == (0, CHUNKS), st
        assert nixl_st["adapter"]["missing"] == CHUNKS  # one counted miss each
        assert (mc_st["objects"], mc_st["vanished"]) == (CHUNKS, 0), mc_st
    finally:
        server.stop()
