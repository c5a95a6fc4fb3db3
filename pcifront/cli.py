"""``pcifront``: the guest agent's command line.

pcifront lspci --connect unix:./pciback.sock --guest guest0 -nn
pcifront lspci --connect ADDR --guest NAME -xxx -s 00:00.0
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Sequence

import trio

from pcifront._client import connect
from pcifront._lspci import DeviceFilter, render_lspci
from pcifront._pciids import PciIds
from shared.errors import PcisplitError
from shared.transport import TransportOptions

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcifront", description="pcisplit guest agent")
    sub = parser.add_subparsers(dest="command", required=True)
    lspci = sub.add_parser("lspci", help="list the guest's virtual PCI bus like lspci")
    lspci.add_argument(
        "--connect",
        required=True,
        metavar="ADDR",
        help="backend address, e.g. unix:./pciback.sock or tls://host:7071",
    )
    lspci.add_argument("--guest", default="guest0", help="guest name to act as (default guest0)")
    lspci.add_argument(
        "-n",
        action="count",
        default=0,
        dest="numeric",
        help="show numeric IDs (-nn: names and numbers)",
    )
    lspci.add_argument(
        "-x",
        action="count",
        default=0,
        dest="hex",
        help="hex dump of config space (-x 64 B, -xxx 256 B, -xxxx 4096 B)",
    )
    lspci.add_argument(
        "-s",
        dest="slot",
        metavar="[[[[DOMAIN]:]BUS]:][DEV][.[FUNC]]",
        help="show only matching devices",
    )
    lspci.add_argument(
        "-d",
        dest="ids",
        metavar="[VENDOR]:[DEVICE][:CLASS]",
        help="show only devices with these IDs",
    )
    lspci.add_argument("-i", dest="ids_file", metavar="FILE", help="pci.ids file to use")
    lspci.add_argument("--cert", help="TLS client certificate (PEM) naming the guest")
    lspci.add_argument("--key", help="TLS client key (PEM)")
    lspci.add_argument("--ca", help="CA certificate (PEM) that signed the backend's certificate")
    lspci.add_argument(
        "--token-file",
        metavar="FILE",
        help="the guest's token, for tcp:// and vsock:// (the backend's token_file for the guest)",
    )
    return parser


def _dump_bytes(count: int) -> int:
    if count == 0:
        return 0
    if count <= 2:
        return 64
    return 256 if count == 3 else 4096


def _tls_options(args: argparse.Namespace) -> TransportOptions:
    options = TransportOptions()
    if args.connect.startswith("tls://"):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
        options.ssl_context = ctx
    return options


def _read_token(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise PcisplitError(f"--token-file: cannot read {path}: {exc.strerror or exc}") from exc


async def _lspci(args: argparse.Namespace) -> str:
    # Validate the selectors before connecting, so a typo costs no round trip.
    DeviceFilter.parse(args.slot, args.ids)
    token = _read_token(args.token_file)
    async with connect(
        args.connect,
        guest=args.guest,
        options=_tls_options(args),
        include_config=True,
        token=token,
    ) as bus:
        devices = list(bus.devices)
    ids = PciIds.load(args.ids_file) if args.numeric != 1 else None
    return render_lspci(
        devices,
        slot=args.slot,
        vendor_device=args.ids,
        numeric=min(args.numeric, 2),
        ids=ids,
        dump_bytes=_dump_bytes(args.hex),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = trio.run(_lspci, args)
    except PcisplitError as exc:
        print(f"pcifront: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
