"""Field metadata and generic validation shared by every config section.

Each section field is declared once with :func:`flag_field`: its flag name, help text and an
optional range check live in the field's metadata, its type and choices in the annotation
(``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, ``X | None``).  From that single
declaration :mod:`kvhive.config.parse` builds the argparse flags, and :func:`validate_fields`
type-checks and range-checks an instance at construction.

Error messages read as a predicate of the flag, so the CLI can print ``f"{flag} {message}"``:
``ConfigError("--port", "must be in 1..65535 (got 0)")``.

The type conversion (:func:`convert`, :func:`checked`) and the range checks
(:mod:`kvhive.config.checks`, re-exported here) are shared with the ``--l2-adapter`` JSON
records (:mod:`kvhive.config.l2_adapters`), so flags and adapter keys accept the same values
and complain in the same words.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from kvhive.config.checks import (
    PORT,
    Check,
    at_least,
    fraction,
    in_range,
    no_nul,
    non_empty,
    positive,
    power_of_two,
)
from kvhive.config.deferred import check_refused_value
from kvhive.errors import ConfigError

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
    aliases: tuple[str, ...] = ()
    """Other spellings of the flag (the reference's, e.g. ``--instance-id``); errors name
    ``flag``."""


def flag_field(
    flag: str,
    *,
    help: str,
    default: Any = dataclasses.MISSING,
    check: Check | None = None,
    default_text: str | None = None,
    repeat: bool = False,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """Declare a config field bound to a command-line flag.  Omit ``default`` for a required flag."""
    spec = FlagSpec(flag, help, check, default_text, repeat, metavar, aliases)
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


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), bool: ("true or false", "booleans")}  # fmt: skip


def type_name(hint: Any, *, plural: bool = False) -> str:
    """How an error message names the type of ``hint`` ("an integer", "a list of strings")."""
    base, _ = unwrap_optional(hint)
    if base in _NAMES:
        return _NAMES[base][plural]
    if get_origin(base) is tuple:
        return f"a list of {type_name(get_args(base)[0], plural=True)}"
    if base in (dict, Mapping) or get_origin(base) in (dict, Mapping) or isinstance(base, type):
        return "JSON objects" if plural else "a JSON object"  # mappings and nested records
    return str(base)


# -- conversion and validation -----------------------------------------------------------------


def from_text(flag: str, hint: Any, raw: Any) -> Any:
    """Convert a command-line value to the field's type (argparse hands us strings)."""
    base, _ = unwrap_optional(hint)
    if not isinstance(raw, str) or base is str or choices_of(base) is not None:
        return raw  # booleans come typed from BooleanOptionalAction; choices are checked later
    try:
        return base(raw.strip())
    except ValueError:
        raise ConfigError(flag, f"must be {type_name(base)} (got {raw!r})") from None


def convert(hint: Any, value: Any) -> tuple[Any, str | None]:
    """Type-check one non-None ``value`` against its annotation, without naming the field.

    Returns ``(stored value, None)`` or ``(value, complaint)``; the complaint is a predicate
    ("must be an integer") the caller prefixes with the field's name and suffixes with the
    value.  Understood annotations: ``int``, ``float`` (ints widened; must be finite), ``str``,
    ``bool`` (never an int, and no int is a bool), ``Literal[...]``, ``tuple[X, ...]`` (a list
    or tuple, stored as a tuple), ``Mapping``/``dict`` (a JSON object, stored read-only),
    and any other class (an instance of it, e.g. a nested record), each optionally ``| None``.
    """
    base, _ = unwrap_optional(hint)
    if get_origin(base) is tuple:  # tuple[X, ...]: a repeatable flag or a JSON array
        item = get_args(base)[0]
        if not isinstance(value, (list, tuple)):
            return value, f"must be {type_name(base)}"
        items = []
        for v in value:
            v, complaint = (v, f"must be {type_name(item)}") if v is None else convert(item, v)
            if complaint == f"must be {type_name(item)}":
                return value, f"must be {type_name(base)}"  # "must be a list of integers"
            if complaint:
                return value, f"items {complaint}"  # "items must be one of a, b"
            items.append(v)
        return tuple(items), None
    choices = choices_of(base)
    if choices is not None:
        ok = any(value == c and type(value) is type(c) for c in choices)
        return value, None if ok else f"must be one of {', '.join(map(str, choices))}"
    if base in (dict, Mapping) or get_origin(base) in (dict, Mapping):
        if not isinstance(value, Mapping):
            return value, f"must be {type_name(base)}"
        return MappingProxyType(dict(value)), None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
    if not ok:
        return value, f"must be {type_name(base)}"
    if base is float and not math.isfinite(value):
        return value, "must be a finite number"
    return value, None


def checked(hint: Any, check: Check | None, value: Any) -> tuple[Any, str | None]:
    """:func:`convert`, then the range ``check`` on the converted value (None passes)."""
    if value is None:
        return None, None
    value, complaint = convert(hint, value)
    if complaint is None and check is not None:
        complaint = check(value)
    return value, complaint


def coerce(flag: str, hint: Any, value: Any) -> Any:
    """Type-check one value against its annotation; ints are widened to float where declared."""
    _, optional = unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(flag, "is required")
    converted, complaint = convert(hint, value)
    if complaint:
        raise ConfigError(flag, f"{complaint} (got {value!r})")
    return converted


def validate_fields(obj: Any) -> None:
    """Type- and range-check every flag-bound field of a (frozen) section instance in place."""
    cls: type = type(obj)
    for info in section_fields(cls):
        value = coerce(info.spec.flag, info.hint, getattr(obj, info.name))
        object.__setattr__(obj, info.name, value)  # frozen: store the widened value
        complaint = info.spec.check(value) if value is not None and info.spec.check else None
        if complaint:
            raise ConfigError(info.spec.flag, f"{complaint} (got {value!r})")
        check_refused_value(info.spec.flag, value)


__all__ = [
    "PORT",
    "Check",
    "FieldInfo",
    "FlagSpec",
    "at_least",
    "checked",
    "choices_of",
    "coerce",
    "convert",
    "flag_field",
    "flag_of",
    "fraction",
    "from_text",
    "in_range",
    "no_nul",
    "non_empty",
    "positive",
    "power_of_two",
    "section_fields",
    "type_name",
    "unwrap_optional",
    "validate_fields",
]
