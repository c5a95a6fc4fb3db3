"""``pcifront mount DIR --connect ADDR --guest NAME``: the sysfs mirror in the foreground.

Runs until SIGINT or SIGTERM, or until the backend goes away, and unmounts
cleanly on every one of those paths (and on any error). It refuses a mount
point that is missing, not a directory, busy or not empty, and says in one
line when ``/dev/fuse`` or pyfuse3 is missing. When mounted it prints one
line, ``mounted <guest>'s bus (<n> devices) at <DIR>``, to standard output.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from pcifront._mount import check_mountpoint, mounted
from pcifront._setpci import OpenBus

__all__ = ["add_mount_parser", "run_mount"]


def add_mount_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    connection_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    parser = sub.add_parser(
        "mount",
        help="mount the guest's bus as a sysfs-shaped tree (for lspci/setpci -A linux-sysfs)",
        description="Mount the guest's virtual bus at DIR, shaped like /sys/bus/pci, until "
        "SIGINT/SIGTERM or the backend goes away. Then: lspci -A linux-sysfs -O "
        "sysfs.path=DIR -vvv",
    )
    parser.add_argument("mountpoint", metavar="DIR", help="an empty directory to mount on")
    connection_options(parser)


async def _serve(args: argparse.Namespace, open_bus: OpenBus) -> str:
    path = Path(args.mountpoint).resolve()
    check_mountpoint(path)  # before connecting: a bad directory costs no round trip
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            open_bus(args, include_config=True) as bus,
            mounted(bus, path),
        ):
            print(
                f"mounted {args.guest}'s bus ({len(bus.devices)} devices) at {path}",
                flush=True,
            )
            reason = ""
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    nonlocal reason
                    async for signum in signals:
                        reason = f"{signal.Signals(signum).name}: unmounted"
                        nursery.cancel_scope.cancel()
                        return

                async def on_backend_gone() -> None:
                    nonlocal reason
                    reason = f"the backend went away ({await bus.wait_closed()}): unmounted"
                    nursery.cancel_scope.cancel()

                nursery.start_soon(on_signal)
                nursery.start_soon(on_backend_gone)
    return reason


def run_mount(args: argparse.Namespace, open_bus: OpenBus) -> int:
    """The ``mount`` subcommand: 0 after a signal, 1 when the backend went away."""
    reason = trio.run(_serve, args, open_bus)
    print(f"pcifront: {reason}", file=sys.stderr, flush=True)
    return 1 if "backend went away" in reason else 0
