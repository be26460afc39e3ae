"""Every op 0.5.7 changed, sent by LMCache 0.5.7's own client to ``kvhive server``
(scenarios in ``drivers/protocol057.py``): ``token_bytes`` keys through store -> lookup ->
retrieve (byte-exact), lookups from ``start``, ``free_lookup_locks`` with ``extra_ranges``,
``negotiate_chunk_size``, the engine-driven registration's new fields and inline tensor
envelopes (byte-exact).  ``skipped_chunks`` needs the shared pool:
``test_interop057_shm_pool.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvhive.bench.servers import ServerProcess

pytestmark = pytest.mark.interop

NULL_BLOCK_ID = 7  # a server flag value a client could not guess (the default is 0)


@pytest.fixture(scope="module")
def kvhive_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """This module's server: no shared pool (engine-driven workers send tensors inline)
    and a ``--null-block-id`` the registration reply must carry."""
    log = tmp_path_factory.mktemp("interop057-protocol") / "kvhive-server.log"
    server = ServerProcess("kvhive", 0.25, ["--null-block-id", str(NULL_BLOCK_ID)], log_path=log)
    server.start(timeout_s=30.0, poll_s=0.05)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def lmcache_driven(drive057: Callable[..., Any], kvhive_server: ServerProcess) -> Any:
    return drive057("lmcache_driven", "--http-url", kvhive_server.http_url)


@pytest.fixture(scope="module")
def engine_driven(drive057: Callable[..., Any]) -> Any:
    return drive057("engine_driven_inline")


def failed(result: Any, step: str) -> str:
    """The error of a step that must have failed (an error reply fails 0.5.7's future)."""
    got = result.steps[step]
    assert not got["ok"], f"{step} should have failed, got {got.get('value')!r}"
    return str(got["error"])


# ---- negotiate_chunk_size -----------------------------------------------------------------


def test_negotiate_chunk_size(lmcache_driven: Any) -> None:
    assert lmcache_driven.value("get_chunk_size") == 256
    assert lmcache_driven.value("negotiate_ok") == 256  # 256 is a multiple of 16
    bad = failed(lmcache_driven, "negotiate_bad")
    assert "--chunk-size 256 is not a multiple" in bad and "--chunk-size 288" in bad
    assert "required_chunk_alignment must be >= 1" in failed(lmcache_driven, "negotiate_zero")


# ---- token_bytes keys: store -> lookup -> retrieve ------------------------------------------


def test_store_lookup_retrieve_with_token_bytes_keys_is_byte_exact(lmcache_driven: Any) -> None:
    assert lmcache_driven.value("register") is None
    assert lmcache_driven.value("store_ok") is True
    assert lmcache_driven.value("lookup_hits") == 2
    assert lmcache_driven.value("retrieve_ok") is True
    assert lmcache_driven.value("retrieve_bytes_equal") is True
    assert lmcache_driven.value("locked_after_retrieve") == 0
    assert lmcache_driven.value("unregister") is None


def test_malformed_token_bytes_get_an_error_reply_naming_the_field(lmcache_driven: Any) -> None:
    ragged = failed(lmcache_driven, "lookup_ragged_token_bytes")
    assert "`token_bytes` of 2067 bytes is not a whole number" in ragged
    beyond = failed(lmcache_driven, "lookup_end_beyond_tokens")
    assert "`end` 518 is beyond the 517 tokens of `token_bytes`" in beyond


# ---- lookups from start and extra_ranges ---------------------------------------------------


def test_a_lookup_from_start_locks_past_it_and_reports_absolute_hits(lmcache_driven: Any) -> None:
    assert lmcache_driven.value("lookup_from_start_hits") == 2  # chunk 0 is the engine's
    assert lmcache_driven.value("locked_after_lookup_from_start") == 1  # chunk 1 only


def test_extra_ranges_release_the_abandoned_lookups_locks_once(lmcache_driven: Any) -> None:
    assert lmcache_driven.value("lookup_again_hits") == 2
    assert lmcache_driven.value("free_extra_1") is None
    assert lmcache_driven.value("free_extra_2") is None
    # the newer lookup's two readers per chunk are all that is left: a double release of the
    # abandoned range would leave chunk 1 unlocked after the first retrieve, a missed one
    # would leave it locked after the second
    assert lmcache_driven.value("locked_after_retrieve_1") == 2
    assert lmcache_driven.value("locked_after_retrieve_2") == 0


# ---- engine-driven: registration and inline tensor envelopes -------------------------------


def test_a_057_registration_gets_null_block_id(engine_driven: Any) -> None:
    reply = engine_driven.value("register")
    assert engine_driven.value("register_reply_type") == "RegisterEngineDrivenContextResponse"
    assert reply["null_block_id"] == NULL_BLOCK_ID
    assert (reply["shm_name"], reply["pool_size"]) == ("", 0)  # inline: no pool


def test_inline_envelope_round_trip_is_byte_exact(engine_driven: Any) -> None:
    assert engine_driven.value("prepare_store") == {"context": {}}
    assert engine_driven.value("commit_store") is True
    assert engine_driven.value("lookup_hits") == 2
    assert engine_driven.value("prepare_retrieve")["success"] is True
    assert engine_driven.value("retrieve_bytes_equal") is True
    assert engine_driven.value("commit_retrieve") is True


def test_a_grouped_envelope_of_the_one_group_is_stored(engine_driven: Any) -> None:
    assert engine_driven.value("commit_store_grouped") is True


@pytest.mark.parametrize("what", ["shape", "dtype", "count"])
def test_envelopes_that_do_not_match_the_registration_fail_the_store(
    engine_driven: Any, what: str
) -> None:
    assert engine_driven.value(f"commit_store_wrong_{what}") is False


def test_multi_group_registrations_are_refused_with_a_reason(engine_driven: Any) -> None:
    error = failed(engine_driven, "register_multi_group")
    assert "group_layouts lists 2 LMCache groups" in error
