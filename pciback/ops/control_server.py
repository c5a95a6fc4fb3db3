"""The control API: a separate, private UNIX socket for the operator (``pciback ctl``).

Guests never see this socket. It is created with mode 0600 (only the
backend's user, and root, can connect) and every connection's peer
credentials are checked again: only uid 0 and the backend's own uid may
use it.

The wire format is one JSON object per line, request then answer, as many as
the client likes on one connection::

    {"command": "assign", "device": "edu1", "guest": "beta"}
    {"ok": true, "result": {...}, "text": "device edu1 assigned to guest beta at 0000:00:01.0 ..."}
    {"ok": false, "error": "device edu9 ...", "code": "NOT_FOUND"}

Commands: ``status``, ``list`` (the host view: every PCI device of the host and
every device served, see :mod:`pciback.ops.hostview`), ``assign``,
``unassign``, ``hide``, ``unhide``, ``reset``. ``device`` is a device id or a
host address. Assign and unassign are the hot-plug operations of
the backend (:class:`pciback.ops.interface.OperatedBackend`), the same ones
a config reload (SIGHUP) uses.

Each connection is contained like a guest's (:class:`ControlServer`): any
failure, a client leaving before its answer or a bug alike, ends that
connection only, is logged once through the backend's rate-limited log and
counted (``ctl status`` shows ``control``). At most :data:`MAX_CONNECTIONS`
are served at once; a client has :data:`IDLE_TIMEOUT` seconds to send each
request line and :data:`SEND_TIMEOUT` seconds to read each answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from pciback._ratelog import RateLimitedLog
from pciback.ops.hostview import DeviceIds, HostScan, format_table, host_view, scan_host, served_row
from pciback.ops.interface import OperatedBackend
from shared.errors import ErrorCode, PcisplitError, reason
from shared.pci import PciAddress
from shared.transport import TransportConnectError
from shared.transport._identity import peercred_identity

if TYPE_CHECKING:
    from pciback.plane.registry import ServedDevice

__all__ = [
    "serve_control",
    "ControlApi",
    "ControlServer",
    "ControlStatistics",
    "ControlError",
    "ControlConnectionError",
    "COMMANDS",
    "MAX_REQUEST",
    "MAX_CONNECTIONS",
]

log = logging.getLogger("pcisplit.backend")

#: Longest request line accepted (a request is a few short names).
MAX_REQUEST = 4096

COMMANDS = ("status", "list", "assign", "unassign", "hide", "unhide", "reset")


class ControlError(PcisplitError):
    """A control request was malformed or refused; the message says why."""

    code = ErrorCode.INVALID_STATE


def _string(request: dict[str, Any], key: str, command: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f"{command} needs {key!r} (a string)", code=ErrorCode.PROTOCOL_ERROR)
    return value


def _served_ids(dev: ServedDevice) -> DeviceIds | None:
    """The device's own vendor, device and class (the caller holds its lock)."""
    try:
        first = dev.provider.config_read(0x00, 4)
        klass = dev.provider.config_read(0x08, 4)
    except (PcisplitError, OSError) as exc:
        log.warning("host view: cannot read the ids of device %s: %s", dev.id, exc)
        return None
    return DeviceIds(first & 0xFFFF, first >> 16, klass >> 8)


class ControlApi:
    """Answers control requests against one running backend."""

    def __init__(self, backend: OperatedBackend) -> None:
        self.backend = backend
        #: The control socket's own counters (its :class:`ControlServer` keeps them).
        self.control_stats = ControlStatistics()
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[tuple[Any, str]]]] = {
            "status": self._status,
            "list": self._list,
            "assign": self._assign,
            "unassign": self._unassign,
            "hide": self._hide,
            "unhide": self._unhide,
            "reset": self._reset,
        }

    async def handle(self, request: Any) -> dict[str, Any]:
        """One request object -> one answer object (never raises for a bad request)."""
        try:
            if not isinstance(request, dict):
                raise ControlError("a request is a JSON object", code=ErrorCode.PROTOCOL_ERROR)
            command = request.get("command")
            handler = self._handlers.get(command) if isinstance(command, str) else None
            if handler is None:
                raise ControlError(
                    f"unknown command {command!r}; known: {', '.join(COMMANDS)}",
                    code=ErrorCode.PROTOCOL_ERROR,
                )
            result, text = await handler(request)
        except PcisplitError as exc:
            return {"ok": False, "error": str(exc), "code": exc.code.name}
        return {"ok": True, "result": result, "text": text}

    async def _status(self, request: dict[str, Any]) -> tuple[Any, str]:
        backend = self.backend
        started = backend.started_at
        uptime = 0.0 if started is None else trio.current_time() - started
        guests = {}
        for name in backend.config.guests:
            guests[name] = {
                "connections": backend.connection_count(name),
                "devices": [dev.id for dev in backend.registry.devices_of(name)],
            }
        stats = backend.statistics().as_dict()
        logs = backend.log_statistics()
        # Guest-triggered log lines by kind: what the rate limit let through and what it
        # only counted (each suppressed run was logged as one summary line).
        stats["log_lines"] = {"logged": dict(logs.logged), "suppressed": dict(logs.suppressed)}
        stats["forced_removals"] = backend.forced_removals
        stats["reset_failures"] = backend.reset_failures
        sessions = [
            {
                "guest": c.guest,
                "connection": c.number,
                "transport": c.transport,
                "requests": c.requests,
                "fds_held": c.fds_held,
            }
            for c in backend.connections()
        ]
        result = {
            "uptime": round(uptime, 3),
            "listen": backend.bound_addresses(),
            "connections": len(sessions),
            "guests": guests,
            "sessions": sessions,
            "counters": stats,
            "control": self.control_stats.as_dict(),
        }
        lines = [
            f"uptime {uptime:.0f} s, {len(sessions)} connection(s) on "
            + (", ".join(result["listen"]) or "nothing")
        ]
        for name, info in guests.items():
            devices = ", ".join(info["devices"]) or "no devices"
            lines.append(f"guest {name}: {info['connections']} connection(s), {devices}")
        limit = backend.config.resources.max_fds_per_connection
        for row in sessions:
            lines.append(
                f"connection {row['connection']} (guest {row['guest']}, {row['transport']}): "
                f"{row['requests']} requests, {row['fds_held']}/{limit} fds held"
            )
        flat = [f"{k} {v}" for k, v in stats.items() if not isinstance(v, dict)]
        lines.append("counters: " + ", ".join(flat))
        control = self.control_stats
        ended = ", ".join(f"{n} {kind}" for kind, n in sorted(control.ended.items()))
        lines.append(
            f"control socket: {control.connections} connection(s), {control.refused} refused, "
            f"ended early: {ended or 'none'}"
        )
        return result, "\n".join(lines)

    async def _scan(self) -> HostScan:
        # Many small sysfs reads: in a thread, so guests are not held up meanwhile.
        return await trio.to_thread.run_sync(scan_host, self.backend.config.sysfs_root)

    async def _ids(self, devices: list[ServedDevice]) -> dict[str, DeviceIds | None]:
        ids: dict[str, DeviceIds | None] = {}
        for dev in devices:
            async with dev.lock:
                ids[dev.id] = _served_ids(dev)
        return ids

    async def _row(self, dev: ServedDevice) -> dict[str, Any]:
        """One served device's row of the host view (the answer to hide, unhide, reset)."""
        ids = await self._ids([dev])
        scan = await self._scan() if dev.config.kind == "host" else None
        found = scan.get(dev.physical) if scan is not None else None
        return served_row(
            dev,
            connected=dev.guest is not None and self.backend.connection_count(dev.guest) > 0,
            ids=ids[dev.id],
            driver=found.driver if found is not None else None,
        )

    async def _list(self, request: dict[str, Any]) -> tuple[Any, str]:
        scan = await self._scan()
        devices = list(self.backend.registry)
        ids = await self._ids(devices)
        rows = host_view(
            devices,
            scan,
            self.backend.config,
            connected=lambda guest: self.backend.connection_count(guest) > 0,
            ids=lambda dev: ids[dev.id],
        )
        text = format_table(rows)
        if scan.problem is not None:
            text += f"\n(host devices not listed: {scan.problem})"
        return rows, text

    async def _device(self, request: dict[str, Any], command: str) -> ServedDevice:
        """The served device ``device`` names; a host device that is not served is refused."""
        text = _string(request, "device", command)
        try:
            return self.backend.registry.find(text)
        except PcisplitError as exc:
            address = _host_address(text)
            if address is None or (await self._scan()).get(address) is None:
                raise
            raise ControlError(
                _not_served(address, command, self.backend.config.source),
                code=ErrorCode.NOT_FOUND,
            ) from exc

    async def _assign(self, request: dict[str, Any]) -> tuple[Any, str]:
        dev = await self._device(request, "assign")
        guest = _string(request, "guest", "assign")
        result = await self.backend.assign(dev.id, guest)
        return result.as_dict(), result.describe()

    async def _unassign(self, request: dict[str, Any]) -> tuple[Any, str]:
        dev = await self._device(request, "unassign")
        result = await self.backend.unassign(dev.id)
        return result.as_dict(), result.describe()

    async def _hide(self, request: dict[str, Any]) -> tuple[Any, str]:
        dev = await self._device(request, "hide")
        self.backend.registry.set_hidden(dev.id, True)
        log.info("device %s hidden by the operator", dev.id)
        return await self._row(dev), f"device {dev.id} is hidden"

    async def _unhide(self, request: dict[str, Any]) -> tuple[Any, str]:
        dev = await self._device(request, "unhide")
        self.backend.registry.set_hidden(dev.id, False)
        log.info("device %s unhidden by the operator", dev.id)
        return await self._row(dev), f"device {dev.id} is offered again"

    async def _reset(self, request: dict[str, Any]) -> tuple[Any, str]:
        dev = await self._device(request, "reset")
        failures = self.backend.reset_failures
        await self.backend.reset_device(dev, "a reset by the operator")
        if self.backend.reset_failures != failures:
            raise ControlError(
                f"device {dev.id} could not be reset; see the backend's log",
                code=ErrorCode.OPERATION_FAILED,
            )
        return await self._row(dev), f"device {dev.id} reset"


def _host_address(text: str) -> PciAddress | None:
    try:
        return PciAddress.parse(text)
    except ValueError:
        return None


def _not_served(address: PciAddress, command: str, source: str) -> str:
    """Why a host device the backend does not serve cannot be ``command``-ed, and what to do."""
    what = {
        "assign": "assigned",
        "unassign": "unassigned (no guest has it)",
        "hide": "hidden (it is offered to no guest already)",
        "unhide": "unhidden",
        "reset": "reset by pcisplit",
    }.get(command, command)
    where = (
        "a config file and start the backend with --config FILE (it runs without one now)"
        if source.startswith("<")
        else f"{source} and restart the backend"
    )
    return (
        f"host device {address} is not served by this backend, so it cannot be {what}; to "
        f'serve it, add a [[device]] table with kind = "host" and address = "{address}" '
        f"(read-only unless writable = true; see docs/operations.md) to {where}"
    )


@dataclass
class ControlStatistics:
    """Counters of the control socket (``pciback ctl status`` shows them under ``control``)."""

    #: Connections accepted, and those open now.
    connections: int = 0
    active: int = 0
    #: Connections turned away at once: a peer that is not root or the backend's user, or
    #: one over :data:`MAX_CONNECTIONS`.
    refused: int = 0
    #: Connections that ended without their client closing cleanly between requests, by
    #: kind (:class:`ControlConnectionError` kinds, plus ``"client went away"`` and
    #: ``"unexpected error"``, a bug: logged with its traceback).
    ended: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {
            "connections": self.connections,
            "active": self.active,
            "refused": self.refused,
            "ended": dict(self.ended),
        }


class ControlConnectionError(PcisplitError):
    """A control client broke the rules of the socket (its connection is ended).

    ``kind`` names the rule, from a fixed vocabulary: it is the log's kind
    and the key of :attr:`ControlStatistics.ended`.
    """

    code = ErrorCode.PROTOCOL_ERROR

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


#: Connections the control socket serves at once; more are answered ``BUSY`` and closed
#: (each holds a file descriptor of the process that also serves the guests).
MAX_CONNECTIONS = 16
#: Seconds a client may take to send a whole request line, once connected or answered.
IDLE_TIMEOUT = 60.0
#: Seconds a client may take to read an answer; one that does not read is disconnected.
SEND_TIMEOUT = 10.0

#: The scope of control-socket lines in the backend's rate-limited log.
LOG_SCOPE = "control socket"


def _parse(line: bytes) -> tuple[Any, dict[str, Any] | None]:
    """A request line -> (the request, None), or (None, the error answer)."""
    try:
        return json.loads(line), None
    except ValueError as exc:  # invalid UTF-8 included (UnicodeDecodeError)
        problem = f"not JSON: {exc}"
    except RecursionError:
        problem = 'nested too deeply; a request is one flat JSON object, e.g. {"command": "status"}'
    return None, {"ok": False, "error": problem, "code": "PROTOCOL_ERROR"}


def _encode(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


class ControlServer:
    """The control socket's connections: each one served inside one net.

    :meth:`serve_connection` is the wrapper every connection runs in, like
    the guest side's: whatever a client does (leave before its answer, send
    garbage or nothing, never read), and whatever fails while it is served,
    ends that connection only; it is logged once through the backend's
    rate-limited log (:mod:`pciback._ratelog`; a bug with its traceback) and
    counted in :attr:`stats`. An operation the client started (a hot-unplug)
    runs to its end even when the client has gone.
    """

    def __init__(self, api: ControlApi, rate_log: RateLimitedLog) -> None:
        self.api = api
        self.stats = api.control_stats
        self._log = rate_log

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one control connection until it ends; never raises (the net)."""
        stats = self.stats
        stats.connections += 1
        stats.active += 1
        number = stats.connections
        try:
            try:
                await self._serve(stream, number)
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        except Exception as exc:  # noqa: BLE001 - the net: every failure ends this connection only
            self._ended(number, exc)
        finally:
            stats.active -= 1

    def _ended(self, number: int, exc: Exception) -> None:
        peer = f"control connection {number}"
        if isinstance(exc, ControlConnectionError):
            kind, level, text, trace = exc.kind, logging.WARNING, str(exc), False
        elif isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
            kind, level, trace = "client went away", logging.INFO, False
            text = f"the client left before its answer ({reason(exc.__cause__ or exc)})"
        else:
            kind, level, trace = "unexpected error", logging.ERROR, True
            text = (
                f"failed unexpectedly (a bug): {type(exc).__name__}: {exc}; this connection "
                "is closed and the backend goes on"
            )
        self.stats.ended[kind] += 1
        self._log.log(LOG_SCOPE, kind, level, "%s: %s", peer, text, exc_info=trace)

    async def _serve(self, stream: trio.SocketStream, number: int) -> None:
        peer = peercred_identity(stream.socket, "control")
        if peer.uid not in (0, os.geteuid()):
            # The socket's mode already keeps others out; this catches a loosened mode.
            self.stats.refused += 1
            self._log.log(
                LOG_SCOPE, "refused", logging.WARNING, "control socket: refused %s",
                peer.describe(),
            )
            await self._send(stream, {
                "ok": False, "error": "not authorized", "code": "NOT_AUTHORIZED"
            })
            return
        if self.stats.active > MAX_CONNECTIONS:
            self.stats.refused += 1
            self._log.log(
                LOG_SCOPE, "refused", logging.WARNING,
                "control socket: refused %s: %d connections are open already",
                peer.describe(), MAX_CONNECTIONS,
            )
            await self._send(stream, {
                "ok": False,
                "error": f"the control socket serves {MAX_CONNECTIONS} connections at once; "
                "try again when the others are done",
                "code": "BUSY",
            })
            return
        buffer = b""
        while True:
            with trio.move_on_after(IDLE_TIMEOUT) as idle:
                while b"\n" not in buffer:
                    if len(buffer) > MAX_REQUEST:
                        await self._send(stream, {
                            "ok": False,
                            "error": f"request longer than {MAX_REQUEST} bytes",
                            "code": "PROTOCOL_ERROR",
                        })
                        raise ControlConnectionError(
                            "over-long request",
                            f"sent a request line longer than {MAX_REQUEST} bytes; disconnected",
                        )
                    data = await stream.receive_some(MAX_REQUEST)
                    if not data:
                        if buffer:
                            raise ControlConnectionError(
                                "incomplete request",
                                f"closed the connection after {len(buffer)} bytes of a "
                                "request line without its newline",
                            )
                        return  # a clean end between requests
                    buffer += data
            if idle.cancelled_caught:
                raise ControlConnectionError(
                    "idle", f"sent no complete request within {IDLE_TIMEOUT:g} s; disconnected"
                )
            line, buffer = buffer.split(b"\n", 1)
            request, answer = _parse(line)
            if answer is None:
                answer = await self.api.handle(request)
            await self._send(stream, answer)

    async def _send(self, stream: trio.SocketStream, answer: dict[str, Any]) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await stream.send_all(_encode(answer))
        if scope.cancelled_caught:
            raise ControlConnectionError(
                "answer not read",
                f"did not read its answer within {SEND_TIMEOUT:g} s; disconnected",
            )


async def serve_control(
    backend: OperatedBackend,
    path: Path,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API on the UNIX socket ``path`` (mode 0600) until cancelled."""
    from shared.transport._sockets import open_unix_listener_socket

    server = ControlServer(ControlApi(backend), backend.control_log)
    old_umask = os.umask(0o177)  # the socket file is born 0600: no window where it is wider
    try:
        sock = await open_unix_listener_socket(str(path))
    except TransportConnectError as exc:
        # Say which socket this is: the guests' listeners were fine.
        raise TransportConnectError(
            f"cannot open the control socket {path} (the one `pciback ctl` talks to): {exc}; "
            'a second backend needs its own: control = "PATH" in its config or '
            "pciback serve --control PATH"
        ) from exc
    finally:
        os.umask(old_umask)
    inode = os.stat(path).st_ino
    listener = trio.SocketListener(sock)
    log.debug("control socket at %s", path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(str(path))
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    log.warning("control socket: accept failed: %s", exc)
                    await trio.sleep(0.1)  # EMFILE and friends: back off rather than spin
                    continue
                nursery.start_soon(server.serve_connection, stream)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)
