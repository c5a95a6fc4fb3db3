"""``pciback ctl``: the operator's client of the control socket.

The server side is :mod:`pciback.ops.control_server`.

    pciback ctl [--control PATH] [--json] status|list
    pciback ctl assign DEVICE GUEST | unassign DEVICE | hide DEVICE | unhide DEVICE | reset DEVICE

Exit status: 0 done, 1 refused or unreachable (the reason on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from pciback.config import load_config
from shared.errors import PcisplitError

__all__ = ["add_ctl_arguments", "run_ctl", "request", "ControlUnreachableError"]

#: How long ctl waits for an answer: hot-plug waits up to [hotplug] ack_timeout.
ANSWER_TIMEOUT = 120.0


class ControlUnreachableError(PcisplitError):
    """The control socket cannot be reached (no backend there, or no permission)."""


def add_ctl_arguments(ctl: argparse.ArgumentParser) -> None:
    """Add the options and commands of ``pciback ctl`` to its parser."""
    ctl.add_argument(
        "--control",
        metavar="PATH",
        help="the control socket (default: from --config, else ./pciback.ctl)",
    )
    ctl.add_argument("--config", metavar="FILE", help="find the control socket from this config")
    commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    specs = {
        "status": ("guests, connections, uptime and counters", ()),
        "list": (
            "the host view: every PCI device of the host and every device served, with "
            "provider, owner, hidden flag, state, addresses, ids and driver",
            (),
        ),
        "assign": ("hot-plug DEVICE into GUEST", ("device", "guest")),
        "unassign": ("hot-unplug DEVICE from its guest (it is reset)", ("device",)),
        "hide": ("offer DEVICE to nobody", ("device",)),
        "unhide": ("offer DEVICE again", ("device",)),
        "reset": ("reset DEVICE", ("device",)),
    }
    for name, (text, params) in specs.items():
        cmd = commands.add_parser(name, help=text, description=text)
        for param in params:
            cmd.add_argument(
                param,
                metavar=param.upper(),
                help="a device id or host address" if param == "device" else "a guest name",
            )
        cmd.add_argument("--json", action="store_true", help="print the answer as JSON")


def _control_path(args: argparse.Namespace) -> Path:
    if args.control:
        return Path(args.control)
    if args.config:
        return load_config(args.config).control_path()
    return Path("pciback.ctl")


def request(path: Path, message: dict[str, Any], *, timeout: float = ANSWER_TIMEOUT) -> Any:
    """Send one request to the control socket at ``path`` and return the answer object."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            try:
                sock.sendall(json.dumps(message).encode() + b"\n")
            except BrokenPipeError:
                pass  # the backend answered (a refusal) and closed before reading: read it
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ControlUnreachableError(
                f"cannot reach the control socket {path}: permission denied: it is only for the "
                f"backend's own user and root (mode 0600), and this is uid {os.geteuid()}; run "
                "pciback ctl as that user or as root"
            ) from exc
        raise ControlUnreachableError(
            f"cannot reach the control socket {path}: {exc.strerror or exc}; is `pciback serve` "
            "running there? (--control PATH or --config FILE say where its control socket is)"
        ) from exc
    if not data:
        raise ControlUnreachableError(
            f"the control socket {path} closed the connection without an answer; is "
            "`pciback serve` still running?"
        )
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ControlUnreachableError(
            f"the control socket {path} answered something that is not JSON"
        ) from exc


def run_ctl(args: argparse.Namespace) -> int:
    """Run one ``pciback ctl`` command; returns the exit status.

    An unreachable socket raises :class:`ControlUnreachableError` (the CLI's
    error path prints it, exit 1); a refusal prints its reason and returns 1.
    """
    message: dict[str, Any] = {"command": args.ctl_command}
    for key in ("device", "guest"):
        if getattr(args, key, None) is not None:
            message[key] = getattr(args, key)
    answer = request(_control_path(args), message)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif answer.get("ok"):
        print(answer.get("text", ""))
    if not answer.get("ok"):
        if not args.json:
            print(
                f"pciback ctl: {args.ctl_command} refused ({answer.get('code')}): "
                f"{answer.get('error')}",
                file=sys.stderr,
            )
        return 1
    return 0
