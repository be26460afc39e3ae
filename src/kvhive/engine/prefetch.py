"""The hook through which a lookup reaches below L1 (the L2 prefetch controller)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kvhive.keys import ObjectKey
from kvhive.storage.owners import Owner


class Prefetcher(Protocol):
    def prefetch(
        self,
        rows: list[list[ObjectKey]],
        owner_of: Callable[[ObjectKey], Owner],
        num_readers: int,
        done: Callable[[int], None],
    ) -> None:
        """Make the longest prefix of ``rows`` resident in L1 and read-locked.

        ``rows[i]`` holds every key chunk i needs (all ranks), for the chunks that
        follow the L1 hit.  Keys already in L1 are locked; missing ones are loaded
        from L2.  Each key gets ``num_readers`` read locks owned by ``owner_of(key)``.
        ``done(n)`` must be called exactly once, from any thread, with the number of
        leading rows that are now resident and locked; a failed or late load ends the
        prefix there.  Must not block the caller.
        """
        ...
