"""Range checks shared by every config field: command-line flags and ``--l2-adapter`` JSON keys.

A check takes a value that already has its declared type and returns the complaint, phrased as
a predicate of the field ("must be > 0"), or None when the value is fine.  The caller names the
field and appends the offending value, e.g. ``--port must be in 1..65535 (got 0)`` or
``--l2-adapter #0 (fs): field 'num_workers' must be > 0 (got 0)``.  Checks never do I/O.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

Check = Callable[[Any], "str | None"]
"""A range check: returns the complaint ("must be > 0") or None when the value is fine."""


def in_range(lo: float, hi: float, note: str = "") -> Check:
    """``lo <= v <= hi``; ``note`` (e.g. what 0 means) is appended in parentheses."""
    suffix = f" ({note})" if note else ""
    return lambda v: None if lo <= v <= hi else f"must be in {lo}..{hi}{suffix}"


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def fraction(v: float) -> str | None:
    """A share in (0, 1]: 0 would never act, above 1 is meaningless."""
    return None if 0 < v <= 1 else "must be in (0, 1]"


def power_of_two(v: int) -> str | None:
    return None if v > 0 and v & (v - 1) == 0 else "must be a power of two"


def non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def no_nul(v: str) -> str | None:
    return "must not contain NUL" if "\x00" in v else None


def relative_path(v: str) -> str | None:
    """A path inside some base directory: not absolute, no ``..`` component ("" is fine)."""
    if os.path.isabs(v) or ".." in v.split("/"):
        return "must be a relative path without '..'"
    return None


def ascii_chars(n: int) -> Check:
    """Exactly ``n`` ASCII characters (e.g. an on-disk magic)."""
    return lambda v: None if len(v) == n and v.isascii() else f"must be {n} ASCII characters"


def unsupported(v: Any) -> str | None:
    """A switch kvhive accepts for compatibility but cannot honour: only its off value passes."""
    return "is not supported" if v else None


def each(check: Check) -> Check:
    """Apply ``check`` to every item of a sequence ("items must be >= 0")."""

    def run(values: Sequence[Any]) -> str | None:
        for v in values:
            complaint = check(v)
            if complaint:
                return f"items {complaint}"
        return None

    return run


PORT: Check = in_range(1, 65535)
