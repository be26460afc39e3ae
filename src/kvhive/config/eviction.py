"""Eviction section: the L1 policy and when and how much it evicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from kvhive.config.fields import flag_field, fraction, validate_fields

EvictionPolicy = Literal["LRU", "IsolatedLRU", "noop"]
"""The one declaration of the eviction policy names: the L1 flag, the L2 adapters' ``eviction``
objects and the policy registry (``kvhive.storage.eviction``) all use these."""


@dataclass(frozen=True)
class EvictionConfig:
    """Configuration of L1 eviction (byte based)."""

    TITLE: ClassVar[str] = "Eviction policy"

    policy: EvictionPolicy = flag_field(
        "--eviction-policy",
        help="L1 eviction policy.  'noop' suits buffer-only mode; 'IsolatedLRU' keeps one LRU per "
        "cache_salt and needs per-salt quotas set through /quota (a salt without a quota gets 0 bytes).",
    )
    trigger_watermark: float = flag_field(
        "--eviction-trigger-watermark",
        default=0.8,
        check=fraction,
        help="Share of L1 memory in use that triggers eviction.",
    )
    ratio: float = flag_field(
        "--eviction-ratio",
        default=0.2,
        check=fraction,
        help="Share of allocated memory evicted once triggered.",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
