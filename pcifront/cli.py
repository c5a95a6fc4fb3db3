"""``pcifront``: the guest agent's command line.

pcifront lspci --connect unix:./pciback.sock --guest guest0 -nn
pcifront lspci --connect ADDR --guest NAME -vvv -s 00:00.0
pcifront setpci --connect ADDR --guest NAME -s 00:00.0 COMMAND=0x0006:0x0006
pcifront mount DIR --connect ADDR --guest NAME
pcifront agent --connect ADDR --guest NAME [--json]
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from pcifront._agent import add_agent_parser, agent_main
from pcifront._client import Bus, connect
from pcifront._lspci import DeviceFilter, render_lspci
from pcifront._mount_cli import add_mount_parser, run_mount
from pcifront._pciids import PciIds
from pcifront._pciutils import find_tool, json_listing, require_tool, run_lspci
from pcifront._setpci import add_setpci_parser, run_setpci
from pcifront._sysfs import DeviceView
from shared.errors import PcisplitError
from shared.transport import TransportOptions

__all__ = ["main", "build_parser"]


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connect",
        required=True,
        metavar="ADDR",
        help="backend address, e.g. unix:./pciback.sock or tls://host:7071",
    )
    parser.add_argument("--guest", default="guest0", help="guest name to act as (default guest0)")
    _add_connection_arguments(parser)


def _lspci_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lspci = sub.add_parser(
        "lspci",
        help="list the guest's virtual PCI bus like lspci",
        description="lspci for the guest's bus. Decoding goes through the system's pciutils "
        "(fed a sysfs-shaped tree of the guest's view); without pciutils only -n/-nn, -x "
        "and -s/-d work.",
    )
    _connection_options(lspci)
    lspci.add_argument("-v", action="count", default=0, dest="verbose",
                       help="be verbose (-vv, -vvv: even more)")
    lspci.add_argument("-k", action="store_true", dest="kernel",
                       help="show kernel drivers handling each device")
    lspci.add_argument("-t", action="store_true", dest="tree", help="show a bus tree")
    lspci.add_argument("-D", action="store_true", dest="domains",
                       help="always show domain numbers")
    lspci.add_argument("-m", action="count", default=0, dest="machine",
                       help="machine-readable output (-mm: the newer format)")
    lspci.add_argument("-b", action="store_true", dest="bus_centric",
                       help="bus-centric view (addresses as the bus sees them)")
    lspci.add_argument("-P", action="count", default=0, dest="path",
                       help="show bridge paths (-PP: with bus numbers)")
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
    lspci.add_argument("--json", action="store_true", help="JSON for scripts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcifront", description="pcisplit guest agent")
    sub = parser.add_subparsers(dest="command", required=True)
    _lspci_parser(sub)
    add_setpci_parser(sub, _connection_options)
    add_mount_parser(sub, _connection_options)
    add_agent_parser(sub)
    _add_connection_arguments(sub.choices["agent"])
    return parser


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """How a guest proves itself: TLS client certificates and tokens."""
    parser.add_argument("--cert", help="TLS client certificate (PEM) naming the guest")
    parser.add_argument("--key", help="TLS client key (PEM)")
    parser.add_argument("--ca", help="CA certificate (PEM) that signed the backend's certificate")
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="the guest's token, for tcp:// and vsock:// (the backend's token_file for the guest)",
    )


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


def open_bus(args: argparse.Namespace, **kwargs: Any) -> AbstractAsyncContextManager[Bus]:
    """Connect as the command line says (address, guest, TLS files, token)."""
    return connect(
        args.connect,
        guest=args.guest,
        options=_tls_options(args),
        token=_read_token(args.token_file),
        **kwargs,
    )


def _lspci_arguments(args: argparse.Namespace) -> list[str]:
    """The real lspci's arguments for what the user asked (sysfs options come first)."""
    argv = []
    for flag, count in (
        ("v", args.verbose), ("m", args.machine), ("P", args.path),
        ("n", args.numeric), ("x", args.hex),
    ):
        if count:
            argv.append("-" + flag * count)
    for flag, on in (("k", args.kernel), ("t", args.tree), ("D", args.domains),
                     ("b", args.bus_centric)):
        if on:
            argv.append("-" + flag)
    for flag, value in (("-s", args.slot), ("-d", args.ids), ("-i", args.ids_file)):
        if value is not None:
            argv += [flag, value]
    return argv


def _needs_pciutils(args: argparse.Namespace) -> bool:
    return bool(
        args.verbose or args.kernel or args.tree or args.domains or args.machine
        or args.bus_centric or args.path
    )


async def _guest_views(args: argparse.Namespace) -> list[DeviceView]:
    async with open_bus(args, include_config=True) as bus:
        views = []
        for dev in bus.devices:
            assert dev.config is not None
            views.append(DeviceView(dev.pci_address, dev.config, dev.bar_sizes))
        return views


async def _lspci(args: argparse.Namespace) -> str:
    # Validate the selectors before connecting, so a typo costs no round trip.
    DeviceFilter.parse(args.slot, args.ids)
    have_pciutils = find_tool("lspci") is not None
    if not have_pciutils and _needs_pciutils(args) and not args.json:
        require_tool("lspci", "pcifront lspci " + " ".join(_lspci_arguments(args)))
    views = await _guest_views(args)
    if args.json:
        ids = PciIds.load(args.ids_file) if args.numeric != 1 else None
        return json_listing(views, slot=args.slot, vendor_device=args.ids, ids=ids)
    if have_pciutils:
        out, err = await trio.to_thread.run_sync(run_lspci, views, _lspci_arguments(args))
        sys.stderr.write(err)
        return out
    ids = PciIds.load(args.ids_file) if args.numeric != 1 else None
    return render_lspci(
        views,
        slot=args.slot,
        vendor_device=args.ids,
        numeric=min(args.numeric, 2),
        ids=ids,
        dump_bytes=_dump_bytes(args.hex),
    )


_COMMANDS = {"lspci": _lspci}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "agent":
        try:
            token = _read_token(args.token_file)
        except PcisplitError as exc:
            print(f"pcifront: {exc}", file=sys.stderr)
            return 1
        return agent_main(args, _tls_options(args), token=token)
    try:
        if args.command == "mount":
            return run_mount(args, open_bus)
        if args.command == "setpci":
            return run_setpci(args, open_bus)
        text = trio.run(_COMMANDS[args.command], args)
    except PcisplitError as exc:
        print(f"pcifront: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
