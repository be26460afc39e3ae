"""L2 section: store and prefetch policies and the adapter cascade (``--l2-adapter``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from kvhive.config.fields import at_least, flag_field, validate_fields
from kvhive.config.l2_adapters import ADAPTER_TYPES, FLAG, AdapterConfig, parse_adapter
from kvhive.errors import ConfigError

StorePolicy = Literal["default", "skip_l1"]
PrefetchPolicy = Literal["default", "retain"]


@dataclass(frozen=True)
class L2Config:
    """Configuration of the L2 tiers: write-behind, prefetch and the adapters."""

    TITLE: ClassVar[str] = "L2 storage"

    store_policy: StorePolicy = flag_field(
        "--l2-store-policy",
        default="default",
        help="Which adapters receive each stored chunk and whether L1 keeps it: 'default' writes "
        "to all adapters and keeps L1; 'skip_l1' writes to all, then frees the L1 copy once every "
        "adapter has it (buffer-only mode, pair with --eviction-policy noop).",
    )
    prefetch_policy: PrefetchPolicy = flag_field(
        "--l2-prefetch-policy",
        default="default",
        help="Loads come from the lowest-index adapter holding each chunk.  'default': loaded "
        "chunks leave L1 after their readers are done; 'retain': they stay in L1.",
    )
    prefetch_max_in_flight: int = flag_field(
        "--l2-prefetch-max-in-flight",
        default=8,
        check=at_least(1),
        help="Maximum number of lookups loading from L2 at once; others wait in arrival order.",
    )
    adapters: tuple[str, ...] = flag_field(
        "--l2-adapter",
        default=(),
        repeat=True,
        metavar="JSON",
        help=f'An L2 adapter as a JSON object with a "type" ({", ".join(ADAPTER_TYPES)}); '
        "repeatable, flag order is the cascade order (reads prefer the lowest index, writes go "
        "to all).",
    )
    specs: tuple[AdapterConfig, ...] = field(init=False, repr=False, compare=False)
    """The validated adapter records, one per ``--l2-adapter``, in flag order."""

    def __post_init__(self) -> None:
        validate_fields(self)
        specs = []
        for i, text in enumerate(self.adapters):
            try:
                raw = json.loads(text)
            except ValueError as exc:
                raise ConfigError(FLAG, f"#{i}: must be a JSON object ({exc})") from None
            specs.append(parse_adapter(i, raw))
        object.__setattr__(self, "specs", tuple(specs))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view with adapter secrets masked (for ``/config``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["adapters"] = [spec.to_dict() for spec in self.specs]
        return out
