"""Presence events of one L2 tier: which keys it now holds or no longer holds.

The KV-event log turns them into STORAGE "stored"/"removed" records (``--kv-events-l2``);
nobody else listens, so everything here is skipped (one dict lookup) unless the bus has a
subscriber for :data:`~kvhive.observability.events.EventType.L2_KEYS_PRESENT`.

Besides this node's own stores and deletes, a shared tier holds objects other nodes wrote.
A lookup that finds a key this node neither tracks (``Tracker``) nor reported before is
*discovered*: reported once as present, and remembered in a bounded set
(:data:`DISCOVERED_KEYS_KEPT`, oldest forgotten first) so repeated lookups do not repeat it.
A discovered key found missing later (lookup or load miss) is reported gone, as a tracked
one is.  Discovered keys are never added to the tracker: another node's objects do not
count against this node's capacity nor become its eviction victims.

Thread-safe (one lock); callers are adapter completion threads and the eviction thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import EventBus
from kvhive.observability.events import EventType

DISCOVERED_KEYS_KEPT = 65536


class PresenceEvents:
    """Publishes :class:`~kvhive.observability.events.L2KeysPresent` / ``L2KeysGone`` for
    adapter ``index``/``name`` (module docstring)."""

    def __init__(
        self, bus: EventBus, index: int, name: str, *, kept: int = DISCOVERED_KEYS_KEPT
    ) -> None:
        self.bus = bus
        self.index = index
        self.name = name
        self._kept = kept
        self._lock = threading.Lock()
        self._discovered: OrderedDict[ObjectKey, None] = OrderedDict()
        self.discovered = 0

    @property
    def wanted(self) -> bool:
        """Whether anyone listens (else every method returns at once)."""
        return self.bus.enabled and self.bus.has_subscribers(EventType.L2_KEYS_PRESENT)

    def stored(self, keys: Sequence[ObjectKey]) -> None:
        """This node's store of ``keys`` completed."""
        if keys and self.wanted:
            self._publish_present(list(keys), "stored")

    def looked_up(
        self,
        keys: Sequence[ObjectKey],
        found: Sequence[bool],
        tracked: Callable[[ObjectKey], bool],
        gone: Sequence[ObjectKey],
    ) -> None:
        """A lookup answered ``found`` for ``keys``; ``tracked(key)`` tells this node's own
        objects; ``gone`` are the tracked keys it found missing (already untracked)."""
        if not self.wanted:
            return
        new: list[ObjectKey] = []
        missing = list(gone)
        with self._lock:
            seen = self._discovered
            for key, ok in zip(keys, found, strict=True):
                if ok:
                    if key not in seen and not tracked(key):
                        seen[key] = None
                        new.append(key)
                elif key in seen:
                    del seen[key]
                    missing.append(key)
            while len(seen) > self._kept:
                seen.popitem(last=False)
            self.discovered += len(new)
        if new:
            self._publish_present(new, "discovered")
        self.gone(missing, "vanished")

    def gone(self, keys: Sequence[ObjectKey], reason: str) -> None:
        """``keys`` are no longer in the tier (``reason``: evicted, deleted, vanished)."""
        if not keys or not self.wanted:
            return
        keys = list(dict.fromkeys(keys))
        with self._lock:
            for key in keys:
                self._discovered.pop(key, None)
        self.bus.publish(
            ev.L2KeysGone(keys=keys, l2_name=self.name, adapter_index=self.index, reason=reason)
        )

    def missed(self, missing: Sequence[ObjectKey], gone: Sequence[ObjectKey]) -> None:
        """A load found ``missing`` absent; ``gone`` are the tracked ones among them (already
        untracked): those and the discovered ones are reported vanished."""
        if not missing or not self.wanted:
            return
        with self._lock:
            extra = [k for k in missing if k in self._discovered]
        self.gone([*gone, *extra], "vanished")

    def _publish_present(self, keys: list[ObjectKey], reason: str) -> None:
        self.bus.publish(
            ev.L2KeysPresent(keys=keys, l2_name=self.name, adapter_index=self.index, reason=reason)
        )
