"""``pciback``: the backend service's command line.

pciback serve                       # embedded default: edu for guest0 on unix:./pciback.sock
pciback serve --config backend.toml --listen tcp://127.0.0.1:7070
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from pciback.config import default_config, load_config
from pciback.service import Backend
from shared.errors import PcisplitError

__all__ = ["main", "build_parser"]

log = logging.getLogger("pcisplit.backend")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pciback", description="pcisplit backend service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve devices to guests")
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config (default: the embedded edu-for-guest0 configuration)",
    )
    serve.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="extra address to listen on (repeatable), e.g. unix:/tmp/b.sock",
    )
    serve.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub.add_parser("show-default-config", help="print the embedded default configuration")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    config = load_config(args.config) if args.config else default_config()
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "show-default-config":
        from pciback.config import DEFAULT_CONFIG_TEXT

        sys.stdout.write(DEFAULT_CONFIG_TEXT)
        return 0
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        trio.run(_serve, args)
    except PcisplitError as exc:
        print(f"pciback: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
