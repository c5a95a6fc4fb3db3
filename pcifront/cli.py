"""``pcifront``: the guest agent's command line.

pcifront lspci --connect unix:./pciback.sock --guest guest0 -nn
pcifront --timeout 5 lspci --connect ADDR --guest NAME -vvv -s 00:00.0
pcifront setpci --connect ADDR --guest NAME -s 00:00.0 COMMAND=0x0004:0x0004
pcifront mount DIR --connect ADDR --guest NAME
pcifront agent --connect ADDR --guest NAME [--json]

Every subcommand is registered on :data:`CLI` (a :class:`shared.cli.Cli`), so it
gets the common error path, ``-v``, ``--version`` and ``--timeout`` for free. A
subcommand that talks to the backend adds the connection options with
:func:`add_connection_options` and connects with :func:`open_bus`, which applies
``--timeout`` and the TLS files, and turns their problems into one-line errors.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from pcifront.client.bus import Bus, connect
from pcifront.tools.agent import AGENT_HELP, add_agent_options, agent_main
from pcifront.tools.lspci import DeviceFilter, render_lspci
from pcifront.tools.mount_cli import add_mount_options, mount_main
from pcifront.tools.pciids import PciIds
from pcifront.tools.pciutils import find_tool, json_listing, require_tool, run_lspci
from pcifront.tools.setpci import add_setpci_options, setpci_main
from pcifront.tools.sysfs import DeviceView
from shared.cli import Cli
from shared.errors import UsageError, reason
from shared.transport import TransportOptions

__all__ = ["CLI", "main", "build_parser", "add_connection_options", "open_bus", "DEFAULT_TIMEOUT"]

#: Seconds ``--timeout`` allows by default for connecting, the handshake and each request.
DEFAULT_TIMEOUT = 30.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


CLI = Cli("pcifront", "pcisplit guest agent")
CLI.common_option(
    "--timeout",
    type=_seconds,
    default=DEFAULT_TIMEOUT,
    metavar="SECONDS",
    help=f"give up on connecting, the handshake or any request after this long "
    f"(default {DEFAULT_TIMEOUT:g})",
)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """``--connect``, ``--guest`` and the TLS files, for subcommands that use :func:`open_bus`."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--connect",
        required=True,
        metavar="ADDR",
        help="backend address, e.g. unix:./pciback.sock or tls://host:7071",
    )
    group.add_argument("--guest", default="guest0", help="guest name to act as (default guest0)")
    group.add_argument(
        "--cert", metavar="FILE", help="TLS client certificate (PEM) naming the guest"
    )
    group.add_argument("--key", metavar="FILE", help="TLS client key (PEM; default: in --cert)")
    group.add_argument(
        "--ca", metavar="FILE", help="CA certificate (PEM) that signed the backend's certificate"
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="the guest's token, for tcp:// and vsock:// (the backend's token_file for the guest)",
    )


def _readable(option: str, path: str) -> str:
    if not Path(path).is_file():
        raise UsageError(f"{option} {path}: no such file")
    return path


def _tls_options(args: argparse.Namespace) -> TransportOptions:
    options = TransportOptions()
    if not args.connect.startswith("tls://"):
        for option in ("cert", "key", "ca"):
            if getattr(args, option):
                raise UsageError(
                    f"--{option} is only used with tls:// addresses, not {args.connect}"
                )
        return options
    if args.key and not args.cert:
        raise UsageError("--key needs --cert (the certificate the key belongs to)")
    try:
        ca = _readable("--ca", args.ca) if args.ca else None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except ssl.SSLError as exc:
        raise UsageError(f"--ca {args.ca}: not a PEM CA certificate ({reason(exc)})") from exc
    if args.cert:
        cert = _readable("--cert", args.cert)
        key = _readable("--key", args.key) if args.key else None
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise UsageError(
                f"--cert {cert}" + (f" --key {key}" if key else "")
                + f": cannot load the certificate and its key ({reason(exc)}); both must be "
                "PEM, the key must match the certificate, and without --key the key must be "
                "in the --cert file"
            ) from exc
    options.ssl_context = ctx
    return options


def _read_token(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"--token-file {path}: cannot read it ({reason(exc)})") from exc


@asynccontextmanager
async def open_bus(args: argparse.Namespace, **kwargs: Any) -> AsyncIterator[Bus]:
    """Connect as the command line says (address, guest, TLS files, token, ``--timeout``)."""
    async with connect(
        args.connect,
        guest=args.guest,
        options=_tls_options(args),
        timeout=args.timeout,
        token=_read_token(args.token_file),
        **kwargs,
    ) as bus:
        yield bus


# ------------------------------------------------------------------------ lspci


def _dump_bytes(count: int) -> int:
    if count == 0:
        return 0
    if count <= 2:
        return 64
    return 256 if count == 3 else 4096


def _lspci_arguments(args: argparse.Namespace) -> list[str]:
    """The real lspci's arguments for what the user asked (the sysfs options come first)."""
    argv = []
    for flag, count in (
        ("v", args.verbose), ("m", args.machine), ("P", args.path),
        ("n", args.numeric), ("x", args.hex),
    ):
        if count:
            argv.append("-" + flag * count)
    for flag, on in (
        ("k", args.kernel), ("t", args.tree), ("D", args.domains), ("b", args.bus_centric)
    ):
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


async def _lspci(args: argparse.Namespace) -> str:
    """lspci's output for the command line ``args`` (through the system's pciutils if any)."""
    # Validate the selectors and files before connecting, so a typo costs no round trip.
    DeviceFilter.parse(args.slot, args.ids)
    if args.ids_file is not None:
        _readable("-i", args.ids_file)
    have_pciutils = find_tool("lspci") is not None
    if not have_pciutils and _needs_pciutils(args) and not args.json:
        require_tool("lspci", "pcifront lspci " + " ".join(_lspci_arguments(args)))
    async with open_bus(args, include_config=True) as bus:
        views = []
        for dev in bus.devices:
            assert dev.config is not None
            views.append(DeviceView(dev.pci_address, dev.config, dev.bar_sizes))
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


async def _lspci_command(args: argparse.Namespace) -> int:
    sys.stdout.write(await _lspci(args))
    return 0


_lspci_parser = CLI.command("lspci", _lspci_command, "list the guest's virtual PCI bus like lspci")
add_connection_options(_lspci_parser)
_lspci_parser.add_argument(
    "-n",
    action="count",
    default=0,
    dest="numeric",
    help="show numeric IDs (-nn: names and numbers)",
)
_lspci_parser.add_argument(
    "-x",
    action="count",
    default=0,
    dest="hex",
    help="hex dump of config space (-x 64 B, -xxx 256 B, -xxxx 4096 B)",
)
_lspci_parser.add_argument(
    "-s",
    dest="slot",
    metavar="[[[[DOMAIN]:]BUS]:][DEV][.[FUNC]]",
    help="show only matching devices",
)
_lspci_parser.add_argument(
    "-d",
    dest="ids",
    metavar="[VENDOR]:[DEVICE][:CLASS]",
    help="show only devices with these IDs",
)
_lspci_parser.add_argument("-i", dest="ids_file", metavar="FILE", help="pci.ids file to use")
# lspci's own -v/-vv/-vvv is the common -v (the same count also raises the log level).
_lspci_parser.add_argument(
    "-k", action="store_true", dest="kernel", help="show kernel drivers handling each device"
)
_lspci_parser.add_argument("-t", action="store_true", dest="tree", help="show a bus tree")
_lspci_parser.add_argument(
    "-D", action="store_true", dest="domains", help="always show domain numbers"
)
_lspci_parser.add_argument(
    "-m", action="count", default=0, dest="machine",
    help="machine-readable output (-mm: the newer format)",
)
_lspci_parser.add_argument(
    "-b", action="store_true", dest="bus_centric",
    help="bus-centric view (addresses as the bus sees them)",
)
_lspci_parser.add_argument(
    "-P", action="count", default=0, dest="path", help="show bridge paths (-PP: with bus numbers)"
)
_lspci_parser.add_argument("--json", action="store_true", help="JSON for scripts")


# ------------------------------------------------------------------------ setpci


async def _setpci(args: argparse.Namespace) -> int:
    return await setpci_main(args, open_bus)


_setpci_parser = CLI.command(
    "setpci", _setpci, "read and write the guest's config space with setpci's syntax"
)
add_connection_options(_setpci_parser)
add_setpci_options(_setpci_parser)


# ------------------------------------------------------------------------ mount


async def _mount(args: argparse.Namespace) -> int:
    return await mount_main(args, open_bus)


_mount_parser = CLI.command(
    "mount", _mount,
    "mount the guest's bus as a tree shaped like /sys/bus/pci (for lspci/setpci -A "
    "linux-sysfs -O sysfs.path=DIR) until SIGINT/SIGTERM or the backend goes away",
)
add_connection_options(_mount_parser)
add_mount_options(_mount_parser)


# ------------------------------------------------------------------------ agent


async def _agent(args: argparse.Namespace) -> int:
    return await agent_main(args, _tls_options(args), token=_read_token(args.token_file))


_agent_parser = CLI.command("agent", _agent, AGENT_HELP)
add_connection_options(_agent_parser)
add_agent_options(_agent_parser)


# ------------------------------------------------------------------------ entry


def build_parser() -> argparse.ArgumentParser:
    """The whole argument parser (for --help and tests)."""
    return CLI.parser


def main(argv: Sequence[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
