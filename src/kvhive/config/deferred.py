"""Flags of ``lmcache server`` (0.5.6 and 0.5.7) that kvhive recognises and refuses: one table.

Every flag of both reference versions is one of three things to kvhive:

* implemented: a field of a config section (its flag or one of its ``aliases``);
* accepted without effect: a field of :class:`kvhive.config.compat.CompatConfig`, whose help
  says why nothing changes (a knob of a feature that is off, as it is in the reference when
  that feature is off);
* refused: a row of :data:`REFUSALS` below.  The flag parses (so it is never "unknown"), and
  a value that asks for the missing feature exits 2 with ``--flag: not supported by kvhive:
  <why>``; the flag's default or off value (``--no-run-script-api-enabled``, an empty
  ``--p2p-advertise-url``) asks for nothing and is accepted, so a command line that spells
  out the defaults still starts.

A row also refuses some values of an implemented flag (``--engine-type blend``,
``--transport grpc``): such a row has no ``parse`` (the section field reads the flag).
Building a feature later means deleting its row and declaring the field in its section.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvhive.errors import ConfigError

NOT_SUPPORTED = "not supported by kvhive"


class FlagRefused(ConfigError):
    """A recognised flag (or value) whose feature kvhive does not have.  Printed as
    ``--flag: not supported by kvhive: <why>``."""

    def __init__(self, flag: str, why: str) -> None:
        super().__init__(flag, f"{NOT_SUPPORTED}: {why}")
        self.why = why


def _given(value: Any) -> bool:
    """Any value but the flag's default/off value (None, False, "", empty list)."""
    return bool(value)


def _always(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class Refusal:
    """A refused flag, or refused values of an implemented flag."""

    flag: str
    why: str
    refuses: Callable[[Any], bool] = _given
    """Which values are refused; the others (the default/off value) are accepted."""
    parse: dict[str, Any] | None = None
    """argparse keywords reading a flag no section declares (arity, type, choices); None
    when a section field reads the flag and this row refuses some of its values."""


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None


_SWITCH: dict[str, Any] = {"action": "store_true"}
_ON_OFF: dict[str, Any] = {"action": argparse.BooleanOptionalAction}


def _text(metavar: str) -> dict[str, Any]:
    return {"metavar": metavar}


# One row per flag (or refused value).  The why reads after "not supported by kvhive: ".
# fmt: off
REFUSALS: tuple[Refusal, ...] = (
    # -- values of implemented flags ---------------------------------------------------------
    Refusal("--engine-type", "--engine-type blend (the CacheBlend engine and its cb_* "
            "operations) is not built; use --engine-type default", lambda v: v == "blend"),
    Refusal("--transport", "--transport grpc is not built; kvhive serves LMCache's ZMQ "
            "protocol only (--transport zmq, the default)", lambda v: v == "grpc"),
    Refusal("--eviction-policy", "--eviction-policy ARC is not built; use LRU, IsolatedLRU "
            "or noop", lambda v: v == "ARC"),
    Refusal("--kv-load-policy", "custom KVLoadPolicy classes ('package.module:ClassName') are "
            "LMCache classes kvhive cannot run; only DEFAULT is accepted",
            lambda v: isinstance(v, str) and ":" in v),
    # -- flags of features kvhive does not have ----------------------------------------------
    Refusal("--enable", "experimental modules are not built (transfer_query, the 0.5.6 "
            "query-tensor transfer over CUDA IPC: register_q_cache/store_q); 0.5.7 dropped "
            "the flag", parse={"nargs": "*", "metavar": "MODULE"}),
    Refusal("--run-script-api-enabled", "there is no /run_script endpoint (in-process remote "
            "code execution is left out on purpose)", parse=_ON_OFF),
    Refusal("--separate-object-groups", "splitting kernel groups into one object group per "
            "sliding-window size at registration (hybrid models) is not built", parse=_ON_OFF),
    Refusal("--p2p-advertise-url", "peer-to-peer KV transfer (a transfer channel between "
            "servers, found through an LMCache coordinator) is not built",
            parse=_text("HOST:PORT")),
    Refusal("--l1-manager", "tagged L1 pools (DRAM/DEVDAX/GDS JSON) are not built; kvhive has "
            "one DRAM L1: use --l1-size-gb, --l1-use-lazy, --l1-init-size-gb, --l1-align-bytes",
            parse={"action": "append", "metavar": "JSON"}),
    Refusal("--l1-use-hugepages", "an L1 from the 2 MiB hugepage pool is not built (kvhive's "
            "L1 is an anonymous mapping, or a POSIX segment with --shm-name)", parse=_ON_OFF),
    Refusal("--l1-devdax-path", "an L1 on a /dev/dax device is not built (the dax L2 adapter "
            "is)", parse=_text("PATH")),
    Refusal("--gds-l1-path", "a GPUDirect Storage L1 needs GPU memory; kvhive's L1 is host "
            "memory", parse=_text("PATH")),
    Refusal("--l1-mlock", "kvhive does not mlock its L1 (the flag works around ROCm moving "
            "pinned pages; kvhive serves CPU engines)", parse=_SWITCH),
    Refusal("--l2-prefetch-inflight-watermark", "admitting L2 prefetches by the L1 bytes they "
            "stage is not built; kvhive bounds them by count (--l2-prefetch-max-in-flight), "
            "so only the default 0.5 is accepted", lambda v: v != 0.5,
            parse={"type": _float, "metavar": "FLOAT"}),
    Refusal("--trace-level", "recording StorageManager calls or the cache-event stream for "
            "replay is not built", _always, parse={"choices": ("storage", "events")}),
    Refusal("--enable-token-trace", "per-lookup mp.request.trace spans carrying token ids are "
            "not built (--enable-tracing exports kvhive's request/lookup/store/retrieve spans)",
            parse=_SWITCH),
    Refusal("--coordinator-url", "the LMCache coordinator client (registration, heartbeats, "
            "cache-event reporting, fleet blend lookups) is not built", parse=_text("URL")),
)
# fmt: on

REFUSED_FLAGS: tuple[Refusal, ...] = tuple(r for r in REFUSALS if r.parse is not None)
"""Rows of flags no section declares (the parser adds them)."""

_VALUE_ROWS: dict[str, Refusal] = {r.flag: r for r in REFUSALS if r.parse is None}


def dest_of(row: Refusal) -> str:
    """The argparse destination of a refused flag (never clashes with a section field)."""
    return "refused." + row.flag.lstrip("-")


def check_refused(row: Refusal, value: Any) -> None:
    """Raise :class:`FlagRefused` when ``value`` asks ``row``'s flag for a missing feature."""
    if row.refuses(value):
        raise FlagRefused(row.flag, row.why)


def check_refused_value(flag: str, value: Any) -> None:
    """Refuse a value of an implemented flag whose feature is missing (``--engine-type
    blend``); called on the raw command-line text and again on the typed field value."""
    row = _VALUE_ROWS.get(flag)
    if row is not None:
        check_refused(row, value)
