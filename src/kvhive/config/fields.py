"""Field metadata and generic validation shared by every config section.

Each section field is declared once with :func:`flag_field`: its flag name, help text and an
optional range check live in the field's metadata, its type and choices in the annotation
(``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, ``X | None``).  From that single
declaration :mod:`kvhive.config.parse` builds the argparse flags, and :func:`validate_fields`
type-checks and range-checks an instance at construction.

Error messages read as a predicate of the flag, so the CLI can print ``f"{flag} {message}"``:
``ConfigError("--port", "must be in 1..65535 (got 0)")``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from kvhive.config.deferred import check_deferred_value
from kvhive.errors import ConfigError

Check = Callable[[Any], "str | None"]
"""A range check: returns the complaint ("must be > 0") or None when the value is fine."""

_META_KEY = "kvhive"


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """What the CLI needs to know about one config field."""

    flag: str
    help: str
    check: Check | None = None
    default_text: str | None = None
    """Shown instead of the default in --help when the default is resolved later (None)."""
    repeat: bool = False
    """tuple[str, ...] fields: one value per occurrence (``--flag A --flag B``), not nargs."""
    metavar: str | None = None


def flag_field(
    flag: str,
    *,
    help: str,
    default: Any = dataclasses.MISSING,
    check: Check | None = None,
    default_text: str | None = None,
    repeat: bool = False,
    metavar: str | None = None,
) -> Any:
    """Declare a config field bound to a command-line flag.  Omit ``default`` for a required flag."""
    spec = FlagSpec(flag, help, check, default_text, repeat, metavar)
    return dataclasses.field(default=default, metadata={_META_KEY: spec})


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One flag-bound field of a section, with its resolved annotation."""

    name: str
    spec: FlagSpec
    hint: Any
    default: Any  # dataclasses.MISSING when the flag is required

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


@functools.cache
def section_fields(cls: type) -> tuple[FieldInfo, ...]:
    """The flag-bound fields of a section dataclass, in declaration order."""
    hints = get_type_hints(cls)
    return tuple(
        FieldInfo(f.name, f.metadata[_META_KEY], hints[f.name], f.default)
        for f in dataclasses.fields(cls)
        if _META_KEY in f.metadata
    )


def flag_of(cls: type, name: str) -> str:
    """The flag of field ``name`` of section ``cls`` (for cross-field error messages)."""
    for info in section_fields(cls):
        if info.name == name:
            return info.spec.flag
    raise KeyError(name)


# -- annotations -------------------------------------------------------------------------------


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return hint, False


def choices_of(hint: Any) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation, else None."""
    base, _ = unwrap_optional(hint)
    return tuple(get_args(base)) if get_origin(base) is Literal else None


def _type_name(base: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        base, str(base)
    )


# -- conversion and validation -----------------------------------------------------------------


def from_text(flag: str, hint: Any, raw: Any) -> Any:
    """Convert a command-line value to the field's type (argparse hands us strings)."""
    base, _ = unwrap_optional(hint)
    if not isinstance(raw, str) or base is str or choices_of(base) is not None:
        return raw  # booleans come typed from BooleanOptionalAction; choices are checked later
    try:
        return base(raw.strip())
    except ValueError:
        raise ConfigError(flag, f"must be {_type_name(base)} (got {raw!r})") from None


def coerce(flag: str, hint: Any, value: Any) -> Any:
    """Type-check one value against its annotation; ints are widened to float where declared."""
    base, optional = unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(flag, "is required")
    if get_origin(base) is tuple:  # tuple[str, ...]: a repeatable/nargs flag
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(flag, f"must be a list of strings (got {value!r})")
        return tuple(value)
    choices = choices_of(base)
    if choices is not None:
        if value not in choices:
            raise ConfigError(flag, f"must be one of {', '.join(choices)} (got {value!r})")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(flag, f"must be {_type_name(base)} (got {value!r})")
    if base is float and not math.isfinite(value):
        raise ConfigError(flag, f"must be a finite number (got {value!r})")
    return value


def validate_fields(obj: Any) -> None:
    """Type- and range-check every flag-bound field of a (frozen) section instance in place."""
    for info in section_fields(type(obj)):
        value = coerce(info.spec.flag, info.hint, getattr(obj, info.name))
        object.__setattr__(obj, info.name, value)  # frozen: store the widened value
        if value is not None and info.spec.check is not None:
            complaint = info.spec.check(value)
            if complaint:
                raise ConfigError(info.spec.flag, f"{complaint} (got {value!r})")
        check_deferred_value(info.spec.flag, value)


# -- reusable range checks ---------------------------------------------------------------------


def in_range(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be in {lo}..{hi}"


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


PORT: Check = in_range(1, 65535)
