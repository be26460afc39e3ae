"""Command-line flags of ``kvhive server``, generated from the section dataclasses.

argparse only recognises flags and their arity: every value arrives as a string (defaults are
suppressed, so the dataclass defaults stay the single source) and is converted and validated by
the sections, so every bad value yields one :class:`ConfigError` naming its flag.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any, NoReturn, get_origin

from kvhive.config.deferred import REFUSED_FLAGS, check_refused, check_refused_value, dest_of
from kvhive.config.fields import FieldInfo, choices_of, from_text, section_fields, unwrap_optional
from kvhive.config.server import ServerConfig, server_sections
from kvhive.errors import ConfigError
from kvhive.hashing import default_none_hash_seed

_METAVARS = {int: "INT", float: "FLOAT", str: "STR"}


# -- building the parser -----------------------------------------------------------------------


def _help_text(info: FieldInfo) -> str:
    parts = [info.spec.help]
    choices = choices_of(info.hint)
    if choices:
        parts.append(f"Choices: {', '.join(choices)}.")
    if info.required:
        parts.append("(required)")
    elif info.spec.default_text is not None:
        parts.append(f"(default: {info.spec.default_text})")
    elif isinstance(info.default, str):
        parts.append(f"(default: {info.default!r})")
    else:
        parts.append(f"(default: {info.default})")
    return " ".join(parts).replace("%", "%%")  # argparse %-formats help strings


def _add_field(group: Any, dest: str, info: FieldInfo) -> None:
    base, _ = unwrap_optional(info.hint)
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": _help_text(info)}
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction  # --flag / --no-flag
    elif get_origin(base) is tuple and info.spec.repeat:  # one value per occurrence
        kwargs.update(action="append", metavar=info.spec.metavar or "VALUE")
    elif get_origin(base) is tuple:  # tuple[str, ...]: zero or more values
        kwargs.update(nargs="*", metavar=info.spec.metavar or "PATH")
    else:
        choices = choices_of(base)
        kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else _METAVARS[base]
    group.add_argument(info.spec.flag, *info.spec.aliases, **kwargs)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``kvhive server`` flag to ``parser``, one argument group per section."""
    for name, cls in server_sections():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        group = parser.add_argument_group(cls.TITLE, doc)
        for info in section_fields(cls):
            _add_field(group, f"{name}.{info.name}", info)
    group = parser.add_argument_group(
        "Not supported by kvhive",
        "Flags of `lmcache server` whose feature kvhive does not have: recognised, and refused "
        "(exit status 2) unless given their default or off value.",
    )
    for row in REFUSED_FLAGS:
        group.add_argument(
            row.flag,
            dest=dest_of(row),
            default=argparse.SUPPRESS,
            help=f"Refused: {row.why}.".replace("%", "%%"),
            **(row.parse or {}),
        )


# -- namespace -> ServerConfig -----------------------------------------------------------------


def config_from_namespace(namespace: argparse.Namespace) -> ServerConfig:
    """Build and validate the configuration from a namespace filled by :func:`add_server_arguments`."""
    given = vars(namespace)
    for row in REFUSED_FLAGS:
        if dest_of(row) in given:
            check_refused(row, given[dest_of(row)])
    for name, cls in server_sections():  # refused values, before their type is checked
        for info in section_fields(cls):
            dest = f"{name}.{info.name}"
            if dest in given:
                check_refused_value(info.spec.flag, given[dest])
    sections: dict[str, Any] = {}
    for name, cls in server_sections():
        kwargs: dict[str, Any] = {}
        for info in section_fields(cls):
            dest = f"{name}.{info.name}"
            if dest in given:
                kwargs[info.name] = from_text(info.spec.flag, info.hint, given[dest])
            elif info.required:
                raise ConfigError(info.spec.flag, "is required")
        if name == "mp":
            _default_none_hash_seed(kwargs)
        sections[name] = cls(**kwargs)
    return ServerConfig(**sections)


def _default_none_hash_seed(kwargs: dict[str, Any]) -> None:
    # Resolve the seed here (not in the dataclass) so construction stays free of environment
    # reads, while /config still shows the seed actually used.
    if kwargs.get("hash_algorithm") == "sha256_cbor" and kwargs.get("none_hash_seed") is None:
        kwargs["none_hash_seed"] = default_none_hash_seed()


# -- one-shot parsing --------------------------------------------------------------------------


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`ConfigError` instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise argparse_error_to_config_error(message)


_ARGUMENT_RE = re.compile(r"^argument (?P<flag>[^:]+): (?P<rest>.*)$", re.DOTALL)
_UNRECOGNIZED = "unrecognized arguments: "


def argparse_error_to_config_error(message: str) -> ConfigError:
    """Turn an argparse error message into a ConfigError naming the offending flag."""
    match = _ARGUMENT_RE.match(message)
    if match:
        flag = match["flag"].split("/")[0]
        return ConfigError(flag, match["rest"])
    if message.startswith(_UNRECOGNIZED):
        first, *others = message[len(_UNRECOGNIZED) :].split()
        more = [arg for arg in others if arg.startswith("-")]
        also = f" (also unknown: {' '.join(more)})" if more else ""
        return ConfigError(first, f"is not a known option{also}")
    return ConfigError("", message)


def new_server_parser(prog: str = "kvhive server") -> ConfigArgumentParser:
    """A parser holding every server flag (abbreviations off: prefixes of flags are ambiguous)."""
    parser = ConfigArgumentParser(
        prog=prog, allow_abbrev=False, description="Run the KV-cache server."
    )
    add_server_arguments(parser)
    return parser


def parse_server_args(argv: Sequence[str]) -> ServerConfig:
    """Parse ``kvhive server`` arguments into a validated :class:`ServerConfig`.

    Raises :class:`ConfigError` for every bad, unknown or missing flag
    (:class:`~kvhive.config.deferred.FlagRefused` for a refused one);
    ``--help`` prints help and raises ``SystemExit(0)`` as argparse does.
    """
    return config_from_namespace(new_server_parser().parse_args(list(argv)))
