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
from pathlib import Path

import trio

from pcifront.tools.mount import check_mountpoint, mounted
from pcifront.tools.setpci import OpenBus

__all__ = ["add_mount_options", "mount_main"]


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    """The mount point (the connection options are the caller's)."""
    parser.add_argument("mountpoint", metavar="DIR", help="an empty directory to mount on")


async def mount_main(args: argparse.Namespace, open_bus: OpenBus) -> int:
    """The ``mount`` subcommand: 0 after SIGINT/SIGTERM, 1 when the backend went away."""
    reason = await _serve(args, open_bus)
    print(f"pcifront: {reason}", file=sys.stderr, flush=True)
    return 1 if "backend went away" in reason else 0


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
