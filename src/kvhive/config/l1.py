"""L1 memory manager section: the host buffer, its allocation and its lock TTLs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvhive.config.fields import (
    at_least,
    flag_field,
    flag_of,
    positive,
    power_of_two,
    validate_fields,
)
from kvhive.errors import ConfigError

GiB = 1 << 30


@dataclass(frozen=True)
class L1Config:
    """Configuration of the L1 memory manager (one host buffer cut into chunk objects)."""

    TITLE: ClassVar[str] = "L1 memory manager"

    size_gb: float = flag_field(
        "--l1-size-gb",
        check=positive,
        help="Size of L1 memory in GiB (converted as int(gb * 2**30) bytes).",
    )
    use_lazy: bool = flag_field(
        "--l1-use-lazy",
        default=True,
        help="Allocate L1 lazily (grow from --l1-init-size-gb) instead of all at start-up.",
    )
    init_size_gb: int = flag_field(
        "--l1-init-size-gb",
        default=20,
        check=at_least(1),
        help="Initial allocation in whole GiB when allocating lazily; capped at the L1 size.",
    )
    align_bytes: int = flag_field(
        "--l1-align-bytes",
        default=4096,
        check=power_of_two,
        help="Alignment of L1 objects in bytes.",
    )
    write_ttl_seconds: int = flag_field(
        "--l1-write-ttl-seconds",
        default=600,
        check=positive,
        help="Lifetime of an object's write lock.",
    )
    read_ttl_seconds: int = flag_field(
        "--l1-read-ttl-seconds",
        default=300,
        check=positive,
        help="Lifetime of an object's read lock.",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.size_bytes < self.align_bytes:
            raise ConfigError(
                flag_of(L1Config, "size_gb"),
                f"must hold at least one {self.align_bytes}-byte aligned object (got {self.size_gb!r})",
            )

    @property
    def size_bytes(self) -> int:
        """L1 capacity in bytes."""
        return int(self.size_gb * GiB)

    @property
    def init_bytes(self) -> int:
        """First lazy allocation in bytes, never more than the capacity."""
        return min(self.init_size_gb * GiB, self.size_bytes)
