"""The router's KV index: which replica holds which token blocks, rebuilt from KV events.

Standard library only (the unit tests import it from kvhive's venv).  The engine's block
hashes are opaque 64-bit ids: this index never compares them across replicas.  It hashes
the *content* itself, as Dynamo does: a block's own hash chains its parent's own hash, the
block size and the block's token ids (:func:`chain_hash`), so two replicas holding the same
prefix hold the same own hashes, and a request's token ids hash the same way.  Each
``(replica, block_size)`` keeps an ``external id -> own hash`` map, so that a
``BlockStored`` names its parent and a ``BlockRemoved`` its blocks by the engine's ids.

Mediums: ``GPU`` and ``CPU`` are held locally by the replica that announced them (vLLM's
prefix cache, kvhive's L1).  ``STORAGE`` (a kvhive L2 tier, shared by the fleet) is loadable
by every replica, so it never tells replicas apart; :meth:`KvIndex.match` reports it apart
(``storage_tokens``) and the router decides on local holdings only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LOCAL_MEDIUMS = frozenset({"GPU", "CPU"})
SHARED_MEDIUM = "STORAGE"
ROOT = 0  # the own hash a first block chains from


def chain_hash(parent: int, block_size: int, tokens: Sequence[int]) -> int:
    """The own hash of a block: 64 bits of BLAKE2b over parent, block size and token ids."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(block_size.to_bytes(4, "little"))
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in tokens))
    return int.from_bytes(h.digest(), "little")


def prefix_hashes(tokens: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """Own hashes of the full blocks of ``tokens`` (at most ``limit``), in order."""
    out: list[int] = []
    parent = ROOT
    n = len(tokens) // block_size
    for i in range(n if limit is None else min(n, limit)):
        parent = chain_hash(parent, block_size, tokens[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


@dataclass(frozen=True, slots=True)
class Stored:
    """A decoded ``BlockStored``: engine ids, the parent's engine id, the blocks' tokens."""

    block_hashes: tuple[int, ...]
    parent: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str


@dataclass(frozen=True, slots=True)
class Removed:
    """A decoded ``BlockRemoved``."""

    block_hashes: tuple[int, ...]
    medium: str


@dataclass(frozen=True, slots=True)
class Cleared:
    """A decoded ``AllBlocksCleared``."""


Event = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class Match:
    """What the index knows of one request, per replica (tokens of its longest prefix)."""

    local_tokens: dict[str, int]  # held in the replica's own GPU/CPU, from block 0 on
    predicted_tokens: dict[str, int]  # of those, counted from the router's own recent routes
    storage_tokens: int  # in a shared STORAGE tier: loadable by every replica


@dataclass(slots=True)
class IndexCounters:
    """What the index did: stored/removed blocks, orphans (unknown parent), unknown removals."""

    stored_blocks: int = 0
    removed_blocks: int = 0
    orphan_blocks: int = 0
    unknown_removals: int = 0
    clears: int = 0


@dataclass(slots=True)
class KvIndex:
    """Own hash -> holders ``{(replica, medium)}``; ``(replica, block_size)`` -> id map.

    Not thread-safe: the router guards it with one lock.  ``predict_ttl_s`` > 0 also counts
    the router's own routing decisions for that long (a request routed to a replica is
    about to be cached there; events confirm it a step later)."""

    block_sizes: set[int] = field(default_factory=set)
    predict_ttl_s: float = 0.0
    counters: IndexCounters = field(default_factory=IndexCounters)
    _holders: dict[int, set[tuple[str, str]]] = field(default_factory=dict)
    _ids: dict[tuple[str, int], dict[int, int]] = field(default_factory=dict)
    _predicted: dict[tuple[str, int], float] = field(default_factory=dict)

    def apply(self, replica: str, events: Iterable[Event]) -> None:
        """Apply one batch of ``replica``'s events, in order."""
        for ev in events:
            if isinstance(ev, Stored):
                self._stored(replica, ev)
            elif isinstance(ev, Removed):
                self._removed(replica, ev.block_hashes, ev.medium)
            else:
                self.clear(replica)

    def _stored(self, replica: str, ev: Stored) -> None:
        bs = ev.block_size
        if bs <= 0:
            return
        self.block_sizes.add(bs)
        ids = self._ids.setdefault((replica, bs), {})
        parent = ROOT if ev.parent is None else ids.get(ev.parent)
        if parent is None:  # its parent was never seen (joined late, or after a gap)
            self.counters.orphan_blocks += len(ev.block_hashes)
            return
        for i, ext in enumerate(ev.block_hashes):
            tokens = ev.token_ids[i * bs : (i + 1) * bs]
            if not tokens:
                break
            parent = chain_hash(parent, bs, tokens)
            ids[ext] = parent
            self._holders.setdefault(parent, set()).add((replica, ev.medium))
            self.counters.stored_blocks += 1

    def _removed(self, replica: str, exts: Iterable[int], medium: str) -> None:
        for ext in exts:
            found = False
            for (rep, _bs), ids in self._ids.items():
                own = ids.get(ext) if rep == replica else None
                if own is None:
                    continue
                found = True
                holders = self._holders.get(own, set())
                holders.discard((replica, medium))
                if not any(r == replica for r, _ in holders):
                    del ids[ext]  # the replica holds it nowhere now
                if not holders:
                    self._holders.pop(own, None)
                self.counters.removed_blocks += 1
            if not found:
                self.counters.unknown_removals += 1

    def clear(self, replica: str) -> None:
        """Forget everything ``replica`` announced (``AllBlocksCleared``, or a stale index
        after a sequence gap that could not be replayed)."""
        self.counters.clears += 1
        for key in [k for k in self._ids if k[0] == replica]:
            del self._ids[key]
        for own in list(self._holders):
            holders = {h for h in self._holders[own] if h[0] != replica}
            if holders:
                self._holders[own] = holders
            else:
                del self._holders[own]
        for key in [k for k in self._predicted if k[0] == replica]:
            del self._predicted[key]

    def predict(self, replica: str, tokens: Sequence[int], now: float | None = None) -> None:
        """Count ``tokens``' full blocks as held by ``replica`` for ``predict_ttl_s``."""
        if self.predict_ttl_s <= 0:
            return
        expiry = (time.monotonic() if now is None else now) + self.predict_ttl_s
        for bs in self.block_sizes:
            for own in prefix_hashes(tokens, bs):
                self._predicted[(replica, own)] = expiry

    def match(
        self, replicas: Sequence[str], tokens: Sequence[int], now: float | None = None
    ) -> Match:
        """Per replica, the longest prefix of ``tokens`` it holds locally (over every block
        size seen), and the longest prefix in a shared tier (``storage_tokens``)."""
        now = time.monotonic() if now is None else now
        local = dict.fromkeys(replicas, 0)
        predicted = dict.fromkeys(replicas, 0)
        storage = 0
        for bs in sorted(self.block_sizes):
            hashes = prefix_hashes(tokens, bs)
            for rep in replicas:
                n_evt = n_all = 0
                for own in hashes:
                    held = any(
                        r == rep and m in LOCAL_MEDIUMS for r, m in self._holders.get(own, ())
                    )
                    if held and n_evt == n_all:
                        n_evt += 1
                    if not held and self._predicted.get((rep, own), 0.0) <= now:
                        break
                    n_all += 1
                if n_all * bs > local[rep]:
                    local[rep] = n_all * bs
                    predicted[rep] = (n_all - n_evt) * bs
            n = 0
            for own in hashes:
                if not any(m == SHARED_MEDIUM for _, m in self._holders.get(own, ())):
                    break
                n += 1
            storage = max(storage, n * bs)
        return Match(local, predicted, storage)

    def expire(self, now: float | None = None) -> None:
        """Drop predictions past their time."""
        now = time.monotonic() if now is None else now
        for key in [k for k, exp in self._predicted.items() if exp <= now]:
            del self._predicted[key]

    def size(self) -> dict[str, int]:
        """Blocks held per ``replica/medium`` (for /router/stats)."""
        out: dict[str, int] = {}
        for holders in self._holders.values():
            for rep, medium in holders:
                key = f"{rep}/{medium}"
                out[key] = out.get(key, 0) + 1
        return out
