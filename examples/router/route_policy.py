"""The router's policy state: replicas, in-flight counts, decisions, event statistics.

No network code here (``router.py`` serves HTTP around it): ``choose`` picks a replica for a
prompt's token ids under ``kv`` (longest locally held prefix, ties and misses to the least
loaded) or ``round_robin``; ``on_batch``/``on_stale`` are the event subscriber's callbacks.
"""

from __future__ import annotations

import statistics
import threading
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from route_index import Cleared, KvIndex, Match, Removed, Stored

if TYPE_CHECKING:
    from route_events import Batch, Source

MAX_DECISIONS = 100_000  # kept for /router/stats
POLICIES = ("kv", "round_robin")
EVENT_NAMES = {Stored: "BlockStored", Removed: "BlockRemoved", Cleared: "AllBlocksCleared"}


@dataclass(slots=True)
class Replica:
    """An engine's OpenAI server and the requests the router has in flight there."""

    name: str
    url: str
    inflight: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request went and why (``reason``: kv_match, least_loaded, round_robin,
    overloaded: the best match was ``max_imbalance`` requests busier than the idlest)."""

    replica: str
    reason: str
    matched_tokens: int
    predicted_tokens: int
    storage_tokens: int
    prompt_tokens: int


@dataclass(slots=True)
class Router:
    """Routing state: replicas, the KV index (under ``lock``), event and decision counts."""

    replicas: list[Replica]
    policy: str = "kv"
    max_imbalance: int = 4
    index: KvIndex = field(default_factory=KvIndex)
    lock: threading.Lock = field(default_factory=threading.Lock)
    decisions: deque[Decision] = field(default_factory=lambda: deque(maxlen=MAX_DECISIONS))
    events: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    stale: Counter[str] = field(default_factory=Counter)
    by_source: Counter[str] = field(default_factory=Counter)  # events per publisher endpoint
    _rr: int = 0

    def on_batch(self, source: Source, batch: Batch) -> None:
        """Subscriber thread: index one batch of ``source``'s replica."""
        with self.lock:
            counts = self.events[source.replica]
            self.by_source[f"{source.replica} {source.endpoint}"] += len(batch.events)
            for ev in batch.events:
                medium = getattr(ev, "medium", "")
                kind = EVENT_NAMES[type(ev)]
                counts[f"{kind}/{medium}" if medium else kind] += 1
                if isinstance(ev, Stored):
                    counts[f"blocks/{ev.block_size}"] += len(ev.block_hashes)
            self.index.apply(source.replica, batch.events)

    def on_stale(self, source: Source, reason: str) -> None:
        """A gap that replay could not fill: forget the replica's holdings."""
        with self.lock:
            self.stale[source.replica] += 1
            self.index.clear(source.replica)

    def choose(self, tokens: list[int]) -> Replica:
        """The replica for a request of ``tokens`` under the current policy."""
        with self.lock:
            names = [r.name for r in self.replicas]
            match = self.index.match(names, tokens) if tokens else Match({}, {}, 0)
            if self.policy == "round_robin":
                rep, reason = self.replicas[self._rr % len(self.replicas)], "round_robin"
                self._rr += 1
            else:
                rep, reason = self._kv_choice(match)
                self.index.predict(rep.name, tokens)
            got = match.local_tokens.get(rep.name, 0)
            self.decisions.append(
                Decision(
                    rep.name,
                    reason,
                    got,
                    match.predicted_tokens.get(rep.name, 0),
                    match.storage_tokens,
                    len(tokens),
                )
            )
            rep.inflight += 1
            if len(self.decisions) % 256 == 0:
                self.index.expire()
            return rep

    def _kv_choice(self, match: Match) -> tuple[Replica, str]:
        idlest = min(self.replicas, key=lambda r: r.inflight)
        best = max(self.replicas, key=lambda r: (match.local_tokens.get(r.name, 0), -r.inflight))
        if match.local_tokens.get(best.name, 0) <= 0:
            return idlest, "least_loaded"
        if best.inflight - idlest.inflight >= self.max_imbalance:
            return idlest, "overloaded"
        return best, "kv_match"

    def done(self, rep: Replica) -> None:
        with self.lock:
            rep.inflight -= 1

    def reset(self) -> None:
        """Zero the decision and event statistics (the index is kept)."""
        with self.lock:
            self.decisions.clear()
            self.events.clear()
            self.by_source.clear()
            self._rr = 0

    def stats(self, subscriber: dict[str, int] | None = None) -> dict[str, Any]:
        """Decisions, matched tokens, events per replica/medium and per source, the index."""
        with self.lock:
            ds = list(self.decisions)
            matched = [d.matched_tokens for d in ds]
            return {
                "policy": self.policy,
                "decisions": len(ds),
                "by_reason": dict(Counter(d.reason for d in ds)),
                "by_replica": dict(Counter(d.replica for d in ds)),
                "matched_tokens_total": sum(matched),
                "matched_tokens_mean": statistics.fmean(matched) if matched else 0.0,
                "predicted_tokens_total": sum(d.predicted_tokens for d in ds),
                "storage_tokens_total": sum(d.storage_tokens for d in ds),
                "matched_tokens": matched,
                "last_decisions": [asdict(d) for d in ds[-20:]],
                "events": {rep: dict(c) for rep, c in self.events.items()},
                "stale": dict(self.stale),
                "events_by_source": dict(self.by_source),
                "index": {
                    "blocks": self.index.size(),
                    "block_sizes": sorted(self.index.block_sizes),
                    **asdict(self.index.counters),
                },
                "subscriber": dict(subscriber or {}),
                "inflight": {r.name: r.inflight for r in self.replicas},
            }
