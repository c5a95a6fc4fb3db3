"""``pciback``: the backend service's command line.

pciback serve                       # embedded default: edu for guest0 on unix:./pciback.sock
pciback serve --config backend.toml --listen tcp://127.0.0.1:7070
pciback check --config backend.toml # validate everything, start nothing (exit 0 or 2)
pciback ctl list                    # the control socket: see pciback/ctl.py

``serve`` runs until SIGTERM or SIGINT (guests are told, devices reset, exit
0); SIGHUP reloads ``--config`` (see :mod:`pciback.lifecycle`). Under systemd
(``Type=notify``) it reports READY=1, RELOADING=1 and STOPPING=1.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from pciback.config import BackendConfig, check_listen, default_config, load_config
from pciback.ctl import add_ctl_parser, run_ctl
from pciback.lifecycle import notify_reloading, reload, sd_notify, summary
from pciback.registry import DeviceRegistry
from pciback.service import Backend, server_ssl_context
from shared.errors import ConfigFileError, PcisplitError

__all__ = ["main", "build_parser", "JsonLogFormatter", "check_config"]

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
    serve.add_argument(
        "-q", "--quiet", action="store_true", help="log errors only; print no startup lines"
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr as text (default) or one JSON object per line",
    )
    check = sub.add_parser(
        "check", help="validate a config (files, devices, TLS) without starting anything"
    )
    check.add_argument("--config", metavar="FILE", required=True, help="the TOML config")
    add_ctl_parser(sub)
    sub.add_parser("show-default-config", help="print the embedded default configuration")
    return parser


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
    level = logging.ERROR if args.quiet else logging.WARNING - 10 * min(args.verbose, 2)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def check_config(path: str | Path) -> BackendConfig:
    """Everything ``serve`` would check before listening: keys, files, devices, TLS."""
    config = load_config(path)
    check_listen(config.listen, config.tls)
    server_ssl_context(config)
    DeviceRegistry(config)  # opens dumps and host devices, builds every policy
    return config


async def _serve(args: argparse.Namespace) -> None:
    config = load_config(args.config) if args.config else default_config()
    backend = Backend(config, extra_listen=args.listen, control=config.control_path())
    say = (lambda text: None) if args.quiet else (lambda text: print(text, flush=True))
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


async def _reload(backend: Backend, args: argparse.Namespace, say: object) -> None:
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
        if callable(say):
            say(f"pciback: reloaded {args.config}: {result.describe()}")
    sd_notify("READY=1")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "show-default-config":
        from pciback.config import DEFAULT_CONFIG_TEXT

        sys.stdout.write(DEFAULT_CONFIG_TEXT)
        return 0
    if args.command == "ctl":
        return run_ctl(args)
    if args.command == "check":
        try:
            config = check_config(args.config)
        except PcisplitError as exc:
            print(f"pciback: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        print(
            f"pciback: {args.config} is valid: {len(config.guests)} guest(s), "
            f"{len(config.devices)} device(s), listening on {', '.join(config.listen) or 'nothing'}"
        )
        return 0
    _setup_logging(args)
    try:
        trio.run(_serve, args)
    except PcisplitError as exc:
        print(f"pciback: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
