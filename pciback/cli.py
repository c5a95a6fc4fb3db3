"""``pciback``: the backend service's command line.

pciback serve                       # embedded default: edu for guest0 on unix:./pciback.sock
pciback serve --config backend.toml --listen tcp://127.0.0.1:7070   # --listen replaces `listen`
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
    default_control_path,
    load_config,
)
from pciback.devices import load_plugin
from pciback.guests.identity import unreachable
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
    "listen_of",
    "control_of",
    "DEFAULT_LISTEN",
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


#: Where ``serve`` listens when neither ``--listen`` nor the config's ``listen`` says:
#: the same address as the embedded default configuration.
DEFAULT_LISTEN = ("unix:./pciback.sock",)


def add_listen_option(parser: argparse.ArgumentParser) -> None:
    """``--listen ADDR`` (repeatable): listen there instead of the config's ``listen``."""
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="listen on ADDR instead of the config's `listen` addresses (repeatable), "
        "e.g. --listen unix:/tmp/b.sock --listen shm:/tmp/b-shm.sock",
    )


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """``--plugin FILE`` (repeatable): Python files run before the config is read."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE",
        help="run this Python file first, e.g. one that calls pciback.register_model "
        "(repeatable); model = \"module:Class\" in a [[device]] needs no plugin",
    )


def config_from(args: argparse.Namespace) -> BackendConfig:
    """The configuration ``--config`` names, checked (listen addresses included).

    The ``--plugin`` files (if the command has the option) run first.
    """
    for plugin in getattr(args, "plugin", ()):
        load_plugin(plugin)
    config = load_config(args.config) if args.config else default_config()
    for i, address in enumerate(config.listen):
        problem = _address_problem(address)
        if problem:
            raise ConfigFileError(f"{config.source}: listen[{i}] {address!r}: {problem}")
    return config


def listen_of(config: BackendConfig, listen: Sequence[str] = ()) -> tuple[str, ...]:
    """Where ``serve`` listens: ``--listen`` if given (it replaces the config's
    ``listen``), else the config's ``listen``, else :data:`DEFAULT_LISTEN`.

    ``pciback check`` and ``pciback serve`` both use this, so they agree.
    """
    for address in listen:
        problem = _address_problem(address)
        if problem:
            raise UsageError(f"--listen {address}: {problem}")
    chosen = tuple(dict.fromkeys(listen)) or config.listen or DEFAULT_LISTEN
    check_listen(chosen, config.tls)
    return chosen


def control_of(config: BackendConfig, listen: Sequence[str], control: str | None = None) -> Path:
    """The control socket: ``--control``, else the config's ``control``, else
    ``pciback.ctl`` beside the first ``unix:`` listener actually used."""
    if control:
        return Path(control)
    return config.control if config.control is not None else default_control_path(listen)


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


#: ``serve``'s own lines (listening, serving, reloaded, stopped, reload refused): on
#: stdout (warnings and errors on stderr), as ``pciback: ...`` text or as JSON objects.
status_log = logging.getLogger("pciback")


class _Below(logging.Filter):
    """Passes records below ``level`` (the stdout half of :data:`status_log`)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def _setup_logging(args: argparse.Namespace) -> None:
    """``--log-format``, ``-q`` and ``-v`` for the service (replaces the CLI's handler).

    The default level is INFO: guests connecting and leaving, devices assigned,
    removed and reset are what an operator expects to see. ``-q`` logs errors
    only (and prints no startup lines), ``-v`` adds debug lines.
    """
    level = logging.ERROR if args.quiet else logging.INFO - 10 * min(args.verbose, 1)
    json_lines = args.log_format == "json"
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter() if json_lines
        else logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The command's own lines: INFO on stdout, WARNING and above on stderr, once each.
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(
            JsonLogFormatter() if json_lines else logging.Formatter("pciback: %(message)s")
        )
    status_log.handlers[:] = [out, err]
    status_log.propagate = False
    status_log.setLevel(logging.WARNING if args.quiet else logging.INFO)


async def _serve(args: argparse.Namespace) -> int:
    config = config_from(args)
    listen = listen_of(config, args.listen)
    _setup_logging(args)
    backend = Backend(config, listen=listen, control=control_of(config, listen, args.control))
    say: Callable[[str], None] = status_log.info
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(backend.serve)
            for address in addresses:
                say(f"listening on {address}")
            say(summary(backend).removeprefix("pciback: "))
            sd_notify("READY=1")
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await _reload(backend, args, say)
                    continue
                name = signal.Signals(signum).name
                say(f"{name} received, shutting down")
                sd_notify("STOPPING=1")
                await backend.say_goodbye(f"the backend is shutting down ({name})")
                nursery.cancel_scope.cancel()
                break
    say("stopped")
    return 0


async def _reload(backend: Backend, args: argparse.Namespace, say: Callable[[str], None]) -> None:
    if not args.config:
        status_log.warning("SIGHUP: nothing to reload (started without --config)")
        return
    notify_reloading()
    try:
        result = await reload(backend, args.config)
    except ConfigFileError as exc:
        # One line (stderr, or one JSON object): the running configuration stays.
        status_log.error("reload refused: %s", exc)
    else:
        say(f"reloaded {args.config}: {result.describe()}")
    sd_notify("READY=1")


_serve_parser = CLI.command("serve", _serve, "serve devices to guests")
add_config_option(_serve_parser)
add_listen_option(_serve_parser)
add_plugin_option(_serve_parser)
_serve_parser.add_argument(
    "--control",
    metavar="PATH",
    help="the control socket for `pciback ctl` (default: the config's `control`, else "
    "pciback.ctl beside the first unix: listener)",
)
_serve_parser.add_argument(
    "-q", "--quiet", action="store_true", help="log errors only; print no startup lines"
)
_serve_parser.add_argument(
    "--log-format",
    choices=("text", "json"),
    default="text",
    help="every line as text (default) or as one JSON object (time, level, logger, message)",
)


# ------------------------------------------------------------------------ check


def check_config(
    path: str | Path, listen: Sequence[str] = (), plugins: Sequence[str] = ()
) -> BackendConfig:
    """Everything ``serve`` checks before it listens: keys, files, devices, TLS.

    ``listen`` and ``plugins`` are ``serve``'s ``--listen`` (replacing the
    config's ``listen``) and ``--plugin``.
    """
    args = argparse.Namespace(config=str(path), plugin=list(plugins))
    config = config_from(args)
    listen_of(config, listen)
    server_ssl_context(config)
    # Opens dumps and host devices and builds every policy, never writing a host device
    # (firmware set-up would set a writable one's decode bits); then lets the files go.
    DeviceRegistry(config, dry_run=True).close()
    return config


def _check(args: argparse.Namespace) -> int:
    try:
        config = check_config(args.config, args.listen, args.plugin)
    except UsageError:
        raise
    except PcisplitError as exc:
        # One line naming the key, whatever the underlying error printed.
        raise ConfigFileError(" ".join(str(exc).split())) from exc
    listen = listen_of(config, args.listen)
    for warning in unreachable(listen, config.guests):
        print(f"pciback: warning: {warning}", file=sys.stderr)
    print(
        f"pciback: {args.config} is valid: {len(config.guests)} guest(s), "
        f"{len(config.devices)} device(s), listening on {', '.join(listen)}"
    )
    return 0


_check_parser = CLI.command(
    "check", _check, "validate a config (files, devices, TLS) without starting anything"
)
_check_parser.add_argument("--config", metavar="FILE", required=True, help="the TOML config")
add_listen_option(_check_parser)
add_plugin_option(_check_parser)

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
