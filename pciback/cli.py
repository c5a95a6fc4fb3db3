"""``pciback``: the backend service's command line.

pciback serve                       # embedded default: edu for guest0 on unix:./pciback.sock
pciback serve --config backend.toml --listen tcp://127.0.0.1:7070
pciback check --config backend.toml # validate everything, start nothing (exit 0 or 2)
pciback ctl list                    # the control socket: see pciback/ops/control_client.py

``serve`` runs until SIGTERM or SIGINT (guests are told, devices reset, exit
0); SIGHUP reloads ``--config`` (see :mod:`pciback.ops.lifecycle`). Under systemd
(``Type=notify``) it reports READY=1, RELOADING=1 and STOPPING=1.

Every subcommand is registered on :data:`CLI` (a :class:`shared.cli.Cli`), so it
gets the common error path (one line on stderr, exit 1 or 2), ``-v`` and
``--version`` for free. A subcommand that needs the configuration adds
``--config`` with :func:`add_config_option` and reads it with :func:`config_from`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from pciback.config import (
    DEFAULT_CONFIG_TEXT,
    BackendConfig,
    check_listen,
    default_config,
    load_config,
)
from pciback.guests.listen import server_ssl_context
from pciback.ops.control_client import add_ctl_arguments, run_ctl
from pciback.ops.lifecycle import notify_reloading, reload, sd_notify, summary
from pciback.plane.registry import DeviceRegistry
from pciback.service import Backend
from shared.cli import Cli
from shared.errors import ConfigFileError, PcisplitError, UsageError
from shared.transport import split_address

__all__ = [
    "CLI",
    "main",
    "build_parser",
    "add_config_option",
    "config_from",
    "check_config",
    "JsonLogFormatter",
]

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


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(args: argparse.Namespace) -> None:
    """``--log-format`` and ``-q`` for the service (replaces the CLI's default handler)."""
    level = logging.ERROR if args.quiet else logging.WARNING - 10 * min(args.verbose, 2)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def _serve(args: argparse.Namespace) -> int:
    config = config_from(args)
    for address in args.listen:
        problem = _address_problem(address)
        if problem:
            raise UsageError(f"--listen {address}: {problem}")
    _setup_logging(args)
    backend = Backend(config, extra_listen=args.listen, control=config.control_path())
    say: Callable[[str], None] = (
        (lambda text: None) if args.quiet else (lambda text: print(text, flush=True))
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(backend.serve)
            for address in addresses:
                say(f"pciback: listening on {address}")
            say(summary(backend))
            sd_notify("READY=1")
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await _reload(backend, args, say)
                    continue
                name = signal.Signals(signum).name
                say(f"pciback: {name} received, shutting down")
                sd_notify("STOPPING=1")
                await backend.say_goodbye(f"the backend is shutting down ({name})")
                nursery.cancel_scope.cancel()
                break
    say("pciback: stopped")
    return 0


async def _reload(backend: Backend, args: argparse.Namespace, say: Callable[[str], None]) -> None:
    if not args.config:
        log.warning("SIGHUP: nothing to reload (pciback serve was started without --config)")
        return
    notify_reloading()
    try:
        result = await reload(backend, args.config)
    except ConfigFileError as exc:
        log.error("SIGHUP: reload refused, the running configuration stays: %s", exc)
        print(f"pciback: reload refused: {exc}", file=sys.stderr, flush=True)
    else:
        say(f"pciback: reloaded {args.config}: {result.describe()}")
    sd_notify("READY=1")


_serve_parser = CLI.command("serve", _serve, "serve devices to guests")
add_config_option(_serve_parser)
_serve_parser.add_argument(
    "--listen",
    action="append",
    default=[],
    metavar="ADDR",
    help="extra address to listen on (repeatable), e.g. unix:/tmp/b.sock",
)
_serve_parser.add_argument(
    "-q", "--quiet", action="store_true", help="log errors only; print no startup lines"
)
_serve_parser.add_argument(
    "--log-format",
    choices=("text", "json"),
    default="text",
    help="log lines on stderr as text (default) or one JSON object per line",
)


# ------------------------------------------------------------------------ check


def check_config(path: str | Path) -> BackendConfig:
    """Everything ``serve`` checks before it listens: keys, files, devices, TLS."""
    args = argparse.Namespace(config=str(path))
    config = config_from(args)
    check_listen(config.listen, config.tls)
    server_ssl_context(config)
    # Opens dumps and host devices and builds every policy, never writing a host device
    # (firmware set-up would set a writable one's decode bits); then lets the files go.
    DeviceRegistry(config, dry_run=True).close()
    return config


def _check(args: argparse.Namespace) -> int:
    try:
        config = check_config(args.config)
    except PcisplitError as exc:
        # One line naming the key, whatever the underlying error printed.
        raise ConfigFileError(" ".join(str(exc).split())) from exc
    listen = ", ".join(config.listen) or "nothing"
    print(
        f"pciback: {args.config} is valid: {len(config.guests)} guest(s), "
        f"{len(config.devices)} device(s), listening on {listen}"
    )
    return 0


_check_parser = CLI.command(
    "check", _check, "validate a config (files, devices, TLS) without starting anything"
)
_check_parser.add_argument("--config", metavar="FILE", required=True, help="the TOML config")

add_ctl_arguments(
    CLI.command("ctl", run_ctl, "inspect and change a running backend (control socket)")
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
