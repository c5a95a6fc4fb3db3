"""The one error path of the ``pciback`` and ``pcifront`` command lines.

Both commands are built with :class:`Cli`; a subcommand is a handler registered
with :meth:`Cli.command`, so every subcommand gets the same behaviour for free:

- an expected failure prints **one line** to stderr, ``PROG: what failed ...``,
  and exits with a documented code (:data:`EXIT_FAILURE` or :data:`EXIT_USAGE`);
- ``-v`` (before or after the subcommand) also shows the traceback of an
  expected failure; without it a traceback appears only for a real bug, followed
  by a line asking for a report;
- ``--version`` prints the installed version;
- a subcommand with ``--log-format json`` gets that failure line as one JSON
  object (``time``, ``level``, ``logger``, ``message``), like its log lines.

Exit codes (documented for users in ``docs/cli.md``):

===  ==========================================================================
0    success
1    a runtime failure (cannot connect, listen, read a device ...), or a refusal
     by the other side (handshake rejected, access denied)
2    bad usage or configuration (an unknown option, an invalid config file, a
     missing certificate file)
===  ==========================================================================

What counts as expected: :class:`~shared.errors.PcisplitError` (``ConfigFileError``
and :class:`UsageError` exit 2, the rest 1), ``OSError`` (with its file name),
``ssl.SSLError``, trio's broken and closed resource errors, timeouts, and Ctrl-C.
Exception groups from trio nurseries are looked through: when every exception in
the group is expected, the first one is reported.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import logging
import ssl
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, NoReturn, TextIO

import trio

from shared.errors import ConfigFileError, PcisplitError, UsageError, reason

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_CODES_HELP",
    "BUG_REPORT",
    "Cli",
    "UsageError",
    "Handler",
    "describe",
    "exit_code",
    "package_version",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CODES_HELP = (
    "exit status: 0 success; 1 runtime failure or refusal by the other side; "
    "2 bad usage or configuration"
)
BUG_REPORT = (
    "this is a bug in pcisplit; please report it with the traceback above "
    "and the command you ran"
)

#: A subcommand: takes the parsed arguments, returns an exit code (None means 0).
#: It may be an ``async def``; the CLI then runs it with ``trio.run``.
Handler = Callable[[argparse.Namespace], "int | Awaitable[int | None] | None"]


def package_version() -> str:
    """pcisplit's version from the installed package metadata."""
    try:
        return importlib.metadata.version("pcisplit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"  # running from a source tree that was never installed


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: they go through the CLI's error path."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _expected(exc: BaseException) -> bool:
    return isinstance(
        exc,
        PcisplitError
        | OSError
        | ssl.SSLError
        | trio.BrokenResourceError
        | trio.ClosedResourceError
        | trio.TooSlowError
        | TimeoutError
        | KeyboardInterrupt,
    )


def exit_code(exc: BaseException) -> int:
    """The exit code of an expected failure."""
    return EXIT_USAGE if isinstance(exc, ConfigFileError | UsageError) else EXIT_FAILURE


def describe(exc: BaseException) -> str:
    """One line saying what failed, never empty."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        return f"the connection was lost ({reason(exc)})"
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return reason(exc)


class Cli:
    """One command (``pciback``, ``pcifront``) and its subcommands."""

    def __init__(self, prog: str, description: str) -> None:
        self.prog = prog
        self.parser = _ArgumentParser(
            prog=prog, description=description, epilog=EXIT_CODES_HELP
        )
        self.parser.add_argument(
            "--version", action="version", version=f"{prog} {package_version()}"
        )
        # Options every subcommand accepts, before or after its name. The copy
        # after the name defaults to SUPPRESS so it does not reset the first one.
        self._common = _ArgumentParser(add_help=False)
        self.common_option(
            "-v", "--verbose", action="count", default=0,
            help="more logging; show the traceback of a failure",
        )
        self._sub = self.parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        #: The parsed subcommand asked for JSON lines (``--log-format json``).
        self._json_lines = False

    def common_option(self, *flags: str, default: Any = None, **kwargs: Any) -> None:
        """Add an option that every subcommand accepts (before or after its name)."""
        self.parser.add_argument(*flags, default=default, **kwargs)
        self._common.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)

    def command(self, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        """Register subcommand ``name``; returns its parser to add arguments to."""
        sub: argparse.ArgumentParser = self._sub.add_parser(
            name, help=help, description=help, parents=[self._common], epilog=EXIT_CODES_HELP
        )
        sub.set_defaults(handler=handler)
        return sub

    def main(self, argv: Sequence[str] | None = None, *, stderr: TextIO | None = None) -> int:
        """Parse ``argv``, run the subcommand, and turn any failure into an exit code."""
        err = stderr or sys.stderr
        verbose = 0
        self._json_lines = False
        try:
            args = self.parser.parse_args(argv)
            verbose = args.verbose
            # A subcommand with ``--log-format json`` gets its failure line as JSON too.
            self._json_lines = getattr(args, "log_format", None) == "json"
            self._logging(verbose)
            handler: Handler = args.handler
            if inspect.iscoroutinefunction(handler):
                result = trio.run(handler, args)
            else:
                result = handler(args)
            assert not inspect.isawaitable(result)
            return EXIT_OK if result is None else int(result)
        except SystemExit as exc:  # --help, --version, or a handler's sys.exit()
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or EXIT_OK
            print(f"{self.prog}: {exc.code}", file=err)
            return EXIT_FAILURE
        except BaseException as exc:  # noqa: BLE001 -- classified below; bugs are re-shown
            return self._report(exc, verbose, err)

    def _logging(self, verbose: int) -> None:
        level = logging.WARNING - 10 * min(verbose, 2)
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def _report(self, exc: BaseException, verbose: int, err: TextIO) -> int:
        leaves = list(_leaves(exc))
        if not all(_expected(leaf) for leaf in leaves):
            traceback.print_exception(exc, file=err)
            print(f"{self.prog}: internal error: {BUG_REPORT}", file=err)
            return EXIT_FAILURE
        first = leaves[0]
        if verbose:
            traceback.print_exception(exc, file=err)
        more = f" (and {len(leaves) - 1} more failures)" if len(leaves) > 1 else ""
        if self._json_lines:
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "level": "ERROR",
                "logger": self.prog,
                "message": f"{describe(first)}{more}",
            }
            print(json.dumps(entry), file=err)
        else:
            print(f"{self.prog}: {describe(first)}{more}", file=err)
        return exit_code(first)
