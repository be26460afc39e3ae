"""LMCache 0.5.7's own client (lmcache-cli 0.5.7rc3.dev0) against ``kvhive server``: the ops
whose wire form did not change, then a lookup with a 0.5.7 key (``token_bytes``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def basics(drive057: Callable[..., Any]) -> Any:
    """One run of the ``basics`` scenario (``drivers/drive.py``), shared by the tests below."""
    return drive057("basics")


def test_client_is_057(basics: Any) -> None:
    assert basics.version == "0.5.7rc3.dev0"
    # the key as 0.5.7 sends it: token_bytes instead of token_ids, the other fields unchanged
    fields = basics.value("key_fields")
    assert "token_bytes" in fields and "token_ids" not in fields


def test_noop_and_chunk_size(basics: Any) -> None:
    assert basics.value("noop") == "OK"
    assert basics.value("get_chunk_size") == 256


def test_lookup_with_057_key(basics: Any) -> None:
    assert basics.value("lookup") is None  # lookup replies with no result frame
    assert basics.value("lookup_hits") == 0  # an empty cache: no hit, but an answer
    assert basics.value("end_session") is None
