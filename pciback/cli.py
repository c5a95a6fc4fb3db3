"""``pciback``: the backend service's command line.

pciback serve                       # embedded default: edu for guest0 on unix:./pciback.sock
pciback serve --config backend.toml --listen tcp://127.0.0.1:7070

Every subcommand is registered on :data:`CLI` (a :class:`shared.cli.Cli`), so it
gets the common error path (one line on stderr, exit 1 or 2), ``-v`` and
``--version`` for free. A subcommand that needs the configuration adds
``--config`` with :func:`add_config_option` and reads it with :func:`config_from`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from pciback.config import DEFAULT_CONFIG_TEXT, BackendConfig, default_config, load_config
from pciback.service import Backend
from shared.cli import Cli
from shared.errors import ConfigFileError, PcisplitError, UsageError
from shared.transport import split_address

__all__ = ["CLI", "main", "build_parser", "add_config_option", "config_from"]

log = logging.getLogger("pcisplit.backend")

CLI = Cli("pciback", "pcisplit backend service")


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (default: the embedded edu-for-guest0 configuration)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config (default: the embedded edu-for-guest0 configuration)",
    )


def config_from(args: argparse.Namespace) -> BackendConfig:
    """The configuration ``--config`` names, checked (listen addresses included)."""
    config = load_config(args.config) if args.config else default_config()
    for i, address in enumerate(config.listen):
        problem = _address_problem(address)
        if problem:
            raise ConfigFileError(f"{config.source}: listen[{i}] {address!r}: {problem}")
    return config


def _address_problem(address: str) -> str | None:
    try:
        split_address(address)
    except PcisplitError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------ serve


async def _serve(args: argparse.Namespace) -> int:
    config = config_from(args)
    for address in args.listen:
        problem = _address_problem(address)
        if problem:
            raise UsageError(f"--listen {address}: {problem}")
    backend = Backend(config, extra_listen=args.listen)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(backend.serve)
            for address in addresses:
                print(f"pciback: listening on {address}", flush=True)
            async for signum in signals:
                print(f"pciback: {signal.Signals(signum).name} received, shutting down", flush=True)
                nursery.cancel_scope.cancel()
                break
    print("pciback: stopped", flush=True)
    return 0


_serve_parser = CLI.command("serve", _serve, "serve devices to guests")
add_config_option(_serve_parser)
_serve_parser.add_argument(
    "--listen",
    action="append",
    default=[],
    metavar="ADDR",
    help="extra address to listen on (repeatable), e.g. unix:/tmp/b.sock",
)


def _show_default_config(args: argparse.Namespace) -> int:
    sys.stdout.write(DEFAULT_CONFIG_TEXT)
    return 0


CLI.command(
    "show-default-config", _show_default_config, "print the embedded default configuration"
)


# ------------------------------------------------------------------------ entry


def build_parser() -> argparse.ArgumentParser:
    """The whole argument parser (for --help and tests)."""
    return CLI.parser


def main(argv: Sequence[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
