"""L2 tiers end to end with the real lmcache 0.5.6 client (kvhive only: the flags the
reference would need differ, and its defects are what these tests rule out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

CHUNKS = 4


@pytest.fixture(autouse=True)
def kvhive_only(target: str) -> None:
    if target != "kvhive":
        pytest.skip("L2 end-to-end tests drive kvhive's /status; run against kvhive")


def _fs(path: Path) -> list[str]:
    return ["--l2-adapter", json.dumps({"type": "fs", "base_path": str(path)})]


def _run(driver, server, *extra: str) -> dict:
    return driver.run("l2.py", "--url", server.rpc_url, "--http", server.http_url,
                      "--chunks", str(CHUNKS), *extra)  # fmt: skip


def _assert_served_from_l2(res: dict) -> None:
    assert res["l1_objects_before_lookup"] == 0
    assert res["hit_chunks"] == CHUNKS
    assert res["retrieve_ok"] is True and res["load_errors"] == []
    assert res["bytes_equal"] is True
    assert res["read_locked_after_session"] == 0


def test_store_clear_lookup_hits_from_l2(fresh_server, driver, tmp_path: Path) -> None:
    mock = json.dumps({"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 20})
    server = fresh_server(l1_size_gb=0.1, extra=[*_fs(tmp_path / "l2"), "--l2-adapter", mock])
    res = _run(driver, server)
    assert res["store_ok"] is True
    assert res["l2_stored"] == [CHUNKS, CHUNKS]  # written behind to both adapters
    _assert_served_from_l2(res)
    assert res["l2_loaded"] == [CHUNKS, 0]  # read from the lowest index
    assert res["l1_objects_after_session"] == 0  # default policy: temporary copies


def test_skip_l1_with_noop_is_a_pure_write_buffer(fresh_server, driver, tmp_path: Path) -> None:
    extra = [*_fs(tmp_path / "l2"), "--l2-store-policy", "skip_l1", "--eviction-policy", "noop"]
    server = fresh_server(l1_size_gb=0.1, extra=extra)
    res = _run(driver, server, "--expect-l1-freed", "--no-clear")
    assert res["l1_objects_after_store"] == 0
    _assert_served_from_l2(res)


def test_retain_keeps_loaded_chunks_in_l1(fresh_server, driver, tmp_path: Path) -> None:
    server = fresh_server(
        l1_size_gb=0.1, extra=[*_fs(tmp_path / "l2"), "--l2-prefetch-policy", "retain"]
    )
    res = _run(driver, server)
    _assert_served_from_l2(res)
    assert res["l1_objects_after_session"] == CHUNKS


def test_fs_data_survives_a_server_restart(fresh_server, driver, tmp_path: Path) -> None:
    first = fresh_server(l1_size_gb=0.1, extra=_fs(tmp_path / "l2"))
    assert _run(driver, first, "--phase", "store")["store_ok"] is True
    first.stop()
    second = fresh_server(l1_size_gb=0.1, extra=_fs(tmp_path / "l2"))
    res = _run(driver, second, "--phase", "load", "--no-clear")
    _assert_served_from_l2(res)
