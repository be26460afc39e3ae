"""0.5.7's ``prepare_store(..., skipped_chunks)`` against ``kvhive server`` with a shared L1
pool (``--shm-name``), sent by LMCache 0.5.7's own client (``drivers/protocol057.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvhive.bench.servers import ServerProcess

pytestmark = pytest.mark.interop

NULL_BLOCK_ID = 3


@pytest.fixture(scope="module")
def kvhive_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """This module's server: the whole L1 in a POSIX segment the worker maps."""
    log = tmp_path_factory.mktemp("interop057-shm") / "kvhive-server.log"
    extra = [
        "--shm-name",
        f"kvhive57-{uuid.uuid4().hex[:8]}",
        "--null-block-id",
        str(NULL_BLOCK_ID),
    ]
    server = ServerProcess("kvhive", 0.25, extra, log_path=log)
    server.start(timeout_s=30.0, poll_s=0.05)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shm(drive057: Callable[..., Any]) -> Any:
    return drive057("engine_driven_shm")


def test_a_057_registration_gets_the_pool_and_null_block_id(shm: Any) -> None:
    reply = shm.value("register")
    assert reply["shm_name"] and reply["pool_size"] > 0
    assert reply["null_block_id"] == NULL_BLOCK_ID


def test_skipped_chunks_get_no_slot_and_the_rest_round_trips(shm: Any) -> None:
    context = shm.value("prepare_store")["context"]
    assert context["chunk_indices"] == [0, 1] and len(context["slots"]) == 2  # chunk 2 skipped
    assert shm.value("commit_store") is True
    assert shm.value("lookup_hits") == 2  # the skipped chunk was never stored
    assert shm.value("prepare_retrieve")["success"] is True
    assert shm.value("retrieve_bytes_equal") is True
    assert shm.value("commit_retrieve") is True
    assert shm.value("unregister") is None
