"""The ``kvhive`` console script: ``kvhive server ...``, ``kvhive bench ...`` and ``kvhive version``.

Only this module exits: bad flags and invalid values print one line
``kvhive server: error: --flag must be ... (got X)`` and return 2; a flag of ``lmcache server``
whose feature kvhive lacks prints ``kvhive server: error: --flag: not supported by kvhive:
<why>`` (also 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import kvhive
from kvhive.bench.cli import add_bench_arguments
from kvhive.config import FlagRefused, add_server_arguments, config_from_namespace
from kvhive.config.parse import argparse_error_to_config_error
from kvhive.errors import ConfigError
from kvhive.log import configure_logging

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _error_line(prog: str, error: ConfigError) -> str:
    """``prog: error: --flag must be ...``; a refused flag reads ``--flag: not supported by
    kvhive: <why>``."""
    if not error.flag:
        message = error.message
    elif isinstance(error, FlagRefused):
        message = f"{error.flag}: {error.message}"
    else:
        message = f"{error.flag} {error.message}"
    return f"{prog}: error: {message}"


class _CliParser(argparse.ArgumentParser):
    """Prints argparse errors as one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        print(_error_line(self.prog, argparse_error_to_config_error(message)), file=sys.stderr)
        self.exit(EXIT_USAGE)


def _cmd_server(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = config_from_namespace(args)
    except ConfigError as exc:
        print(_error_line(parser.prog, exc), file=sys.stderr)
        return EXIT_USAGE
    # Imported here so `kvhive version` and `--help` need none of the server's dependencies.
    from kvhive.cli import serve

    try:
        return serve.serve(config)
    except ConfigError as exc:  # found while opening resources (plugin import, L2 adapter)
        print(_error_line(parser.prog, exc), file=sys.stderr)
        return EXIT_USAGE


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvhive.bench.cli import run_bench_command  # the bench needs nothing at server start

    return run_bench_command(args)


def _cmd_version(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(f"kvhive {kvhive.__version__}")
    return 0


Command = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = _CliParser(
        prog="kvhive",
        description="kvhive: a KV-cache server for LLM engines (LMCache 0.5.6 compatible).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"kvhive {kvhive.__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    server = commands.add_parser(
        "server",
        help="run the KV-cache server (ZMQ + HTTP)",
        description="Run the KV-cache server.  Flags mirror `lmcache server`.",
        allow_abbrev=False,
    )
    add_server_arguments(server)
    server.set_defaults(handler=_cmd_server, command_parser=server)
    bench = commands.add_parser(
        "bench",
        help="benchmark a server (vs memcpy and, optionally, `lmcache server`)",
        description="Start servers, drive them with the lmcache 0.5.6 client and kvhive's "
        "own client, and report GB/s, latencies and start-up time as ratios to memcpy "
        "(and to `lmcache server` with --vs-reference).",
        allow_abbrev=False,
    )
    add_bench_arguments(bench)
    bench.set_defaults(handler=_cmd_bench, command_parser=bench)
    version = commands.add_parser("version", help="print the kvhive version")
    version.set_defaults(handler=_cmd_version, command_parser=version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (also for argparse's own exits)."""
    configure_logging()
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(None if argv is None else list(argv))
        handler: Command | None = getattr(args, "handler", None)
        if unknown:  # reported by the command's parser so the line reads "kvhive server: ..."
            getattr(args, "command_parser", parser).error(
                f"unrecognized arguments: {' '.join(unknown)}"
            )
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args, args.command_parser)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:  # the command boundary: log with traceback, fail the process
        logger.exception("kvhive %s failed", args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
