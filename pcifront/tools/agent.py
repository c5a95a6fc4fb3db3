"""``pcifront agent``: the long-running guest agent.

It connects with ``reconnect=`` (exponential back-off, also for the first
connection), lists the devices present, then reports every change of the
guest's bus as it happens: hot-plug events from the backend, and the
differences found by re-enumerating after a reconnect. It also reports the
link going down and coming back. One line per event on stdout, as text or
(``--json``) as JSON objects:

    connected unix:./pciback.sock guest0
    present 0000:00:00.0 1234:11e8 class 00ff00
    added 0000:00:01.0 1234:11e8 class 00ff00
    removed 0000:00:01.0 1234:11e8 class 00ff00 (unassigned by the operator)
    down the backend closed the connection
    up unix:./pciback.sock attempt 3

It runs until SIGINT or SIGTERM (exit 0). It exits 1 when the backend
refuses the guest (at the start, or after a restart).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import TextIO

import trio

from pcifront.client.bus import Device, connect
from pcifront.client.changes import DeviceChange
from pcifront.client.reconnect import LinkEvent, ReconnectPolicy
from pcifront.core.errors import ConnectionLostError
from shared.errors import UsageError
from shared.transport import TransportOptions

__all__ = ["AGENT_HELP", "add_agent_options", "agent_main", "run_agent", "AgentOutput"]


AGENT_HELP = "run the guest agent: report device changes, reconnect when the backend restarts"


def add_agent_options(agent: argparse.ArgumentParser) -> None:
    """The ``agent`` subcommand's own options (the connection options are added by the caller)."""
    agent.add_argument("--json", action="store_true", help="one JSON object per line")
    agent.add_argument(
        "--retry-initial",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="first reconnect delay; doubles on each failure (default 0.1)",
    )
    agent.add_argument(
        "--retry-max",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="longest reconnect delay (default 10)",
    )


class AgentOutput:
    """Writes the agent's events to ``out``, as text or JSON lines, flushed per line."""

    def __init__(self, out: TextIO, *, json_lines: bool) -> None:
        self._out = out
        self._json = json_lines

    def _write(self, record: dict[str, object], text: str) -> None:
        self._out.write((json.dumps(record) if self._json else text) + "\n")
        self._out.flush()

    def connected(self, address: str, guest: str) -> None:
        self._write(
            {"event": "connected", "address": address, "guest": guest},
            f"connected {address} {guest}",
        )

    def present(self, dev: Device) -> None:
        record = _describe(dev)
        record["event"] = "present"
        self._write(record, f"present {_text(dev)}")

    def change(self, change: DeviceChange[Device]) -> None:
        record = change.as_dict()
        text = f"{change.kind.value} {_text(change.device)}"
        if change.reason:
            text += f" ({change.reason})"
        self._write(record, text)

    def link(self, event: LinkEvent) -> None:
        text = f"{event.state} {event.detail}"
        if event.state == "up":
            text += f" attempt {event.attempt}"
        self._write(event.as_dict(), text)

    def stopped(self, why: str) -> None:
        self._write({"event": "stopped", "detail": why}, f"stopped {why}")


def _describe(dev: Device) -> dict[str, object]:
    return {
        "address": dev.address,
        "vendor_id": f"{dev.vendor_id:04x}",
        "device_id": f"{dev.device_id:04x}",
        "class": f"{dev.class_code:06x}",
    }


def _text(dev: Device) -> str:
    return f"{dev.address} {dev.vendor_id:04x}:{dev.device_id:04x} class {dev.class_code:06x}"


async def run_agent(
    address: str,
    guest: str,
    output: AgentOutput,
    *,
    options: TransportOptions | None = None,
    token: bytes | None = None,
    initial_delay: float = 0.1,
    max_delay: float = 10.0,
    timeout: float | None = None,
) -> int:
    """Run the agent until SIGINT/SIGTERM (0) or until the backend refuses the guest (1)."""
    policy = ReconnectPolicy(
        initial_delay=initial_delay, max_delay=max(initial_delay, max_delay), on_link=output.link
    )
    status = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    output.stopped(signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with connect(
                address, guest, options=options, reconnect=policy, timeout=timeout, token=token
            ) as bus:
                changes = bus.changes()  # before anything can change
                output.connected(address, guest)
                for dev in bus.devices:
                    output.present(dev)
                try:
                    async for change in changes:
                        output.change(change)
                except ConnectionLostError as exc:
                    print(f"pcifront agent: {exc}", file=sys.stderr)
                    status = 1
            nursery.cancel_scope.cancel()
    return status


async def agent_main(
    args: argparse.Namespace, options: TransportOptions, *, token: bytes | None = None
) -> int:
    """``pcifront agent`` (run by :mod:`pcifront.cli`, whose error path reports failures)."""
    if not 0 < args.retry_initial <= 3600 or not 0 < args.retry_max <= 3600:
        raise UsageError("--retry-initial and --retry-max must be 0 < s <= 3600")
    output = AgentOutput(sys.stdout, json_lines=args.json)
    # Reports go to stdout; diagnostics (lost connections, failed attempts) to stderr.
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        stream=sys.stderr,
        format="pcifront agent: %(message)s",
        force=True,
    )
    return await run_agent(
        args.connect,
        args.guest,
        output,
        options=options,
        token=token,
        initial_delay=args.retry_initial,
        max_delay=args.retry_max,
        timeout=args.timeout,
    )
