"""A raw vfio-user client over an AF_UNIX socket: the codec plus blocking I/O.

The I/O wrapper only moves bytes and descriptors (``sendmsg``/``recvmsg`` with
SCM_RIGHTS); :class:`shared.protocol.vfio_user.VfioUserConnection` decides
everything else. It is blocking on purpose: device providers answer config
and BAR accesses synchronously (``pciback.devices``), and the benchmarks
drive servers through the same client, one request at a time (:meth:`call`)
or pipelined (:meth:`pipeline`).

Every call is bounded by ``timeout`` as a whole (a deadline, not a limit per
read, so a server trickling bytes cannot stretch it). A server that stalls past it, closes
the socket, or breaks the protocol makes the client *lost*
(:class:`VfioUserServerLost`): the socket is closed and every later call
fails at once with the same error, so one bad server costs its callers one
time-out at most. An errno reply is not a failure of the connection
(:class:`VfioUserErrnoError`).

Server-to-client commands (DMA_READ/DMA_WRITE) that arrive while a reply is
awaited are answered by ``dma_handler`` or, without one, refused with EFAULT:
this client maps no memory for the server.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from shared.errors import ErrorCode, PcisplitError
from shared.protocol import vfio_user as vu

__all__ = [
    "VfioUserClient",
    "VfioUserServerError",
    "VfioUserErrnoError",
    "VfioUserServerLost",
    "DmaHandler",
]

#: Answers a server's DMA_READ (returns the bytes) or DMA_WRITE (returns None).
DmaHandler = Callable[[vu.Body], "bytes | None"]
_RECV_SIZE = 256 * 1024


class VfioUserServerError(PcisplitError):
    """Base of the errors a vfio-user server causes."""

    code = ErrorCode.OPERATION_FAILED


class VfioUserErrnoError(VfioUserServerError):
    """The server answered a command with an error reply (``errno``); the connection is fine."""

    def __init__(self, command: vu.Command, errno_value: int) -> None:
        name = errno.errorcode.get(errno_value, str(errno_value))
        super().__init__(
            f"the vfio-user server refused {command.name}: {name} ({os.strerror(errno_value)})"
        )
        self.command = command
        self.errno = errno_value


class VfioUserServerLost(VfioUserServerError):
    """The server closed the connection, stalled past the time-out or broke the protocol.

    The connection is closed; the device behind it is unusable until the
    backend is told to reconnect (reload, or a new device entry).
    """

    code = ErrorCode.OPERATION_FAILED


class VfioUserClient:
    """One connection to a vfio-user server (one device)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = 5.0,
        limits: vu.VfioUserLimits | None = None,
        name: str = "vfio-user server",
        dma_handler: DmaHandler | None = None,
    ) -> None:
        self._sock: socket.socket | None = sock
        self.timeout = timeout
        self.name = name
        self.conn = vu.VfioUserConnection(vu.Role.CLIENT, limits)
        self.dma_handler = dma_handler
        self._lost: VfioUserServerLost | None = None
        self._early: list[vu.Received] = []
        self._deadline = 0.0
        #: The server's VERSION reply (set by :meth:`negotiate`).
        self.server_version: vu.Version | None = None
        #: Called with the socket's descriptor just before it is closed (the
        #: provider wakes trio tasks waiting on it).
        self.closing_hook: Callable[[int], None] | None = None
        sock.settimeout(timeout)

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        limits: vu.VfioUserLimits | None = None,
        capabilities: vu.Capabilities | None = None,
    ) -> VfioUserClient:
        """Connect to the server at ``path`` and negotiate the version."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            raise VfioUserServerLost(
                f"cannot connect to the vfio-user server at {os.fspath(path)}: "
                f"{exc.strerror or exc}"
                " (is the server running, and is this its socket?)"
            ) from exc
        client = cls(sock, timeout=timeout, limits=limits, name=f"vfio-user server {path}")
        try:
            client.negotiate(capabilities)
        except BaseException:
            client.close()
            raise
        return client

    # -- life cycle -------------------------------------------------------------------

    @property
    def lost(self) -> VfioUserServerLost | None:
        """Why the connection was lost, or None while it works."""
        return self._lost

    def fileno(self) -> int:
        """The socket's descriptor (to wait for the server to speak unasked)."""
        if self._sock is None:
            raise self._lost or VfioUserServerLost(f"{self.name}: the client is closed")
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            _close_fds(self.conn.take_held_fds())
            if self.closing_hook is not None:
                self.closing_hook(sock.fileno())
            sock.close()
        if self._lost is None:
            self._lost = VfioUserServerLost(f"{self.name}: the client was closed")

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _lose(self, why: str) -> VfioUserServerLost:
        if self._lost is None or self._sock is not None:
            self._lost = VfioUserServerLost(f"{self.name}: {why}; the connection is closed")
        self.close()
        assert self._lost is not None
        return self._lost

    # -- the protocol -----------------------------------------------------------------

    def negotiate(self, capabilities: vu.Capabilities | None = None) -> vu.Version:
        """Propose version 0.0 with our limits (plus ``capabilities``); returns the reply."""
        self._arm()
        proposal = vu.Version(0, 0, self.conn.advertised(capabilities))
        reply = self._round_trip(proposal, None, ())
        assert isinstance(reply, vu.Version)
        self.server_version = reply
        return reply

    def call(
        self, body: vu.Body, *, command: vu.Command | None = None, fds: Sequence[int] = ()
    ) -> vu.Body:
        """Send one command and wait for its reply body (raises on an errno reply)."""
        self._arm()
        return self._round_trip(body, command, fds)

    def post(self, body: vu.Body, *, command: vu.Command | None = None) -> None:
        """Send a command with the no-reply flag (a posted write)."""
        self._arm()
        _, data = self._encode(body, command, no_reply=True, fds=0)
        self._send(data, ())

    def pipeline(self, bodies: Sequence[vu.Body]) -> list[vu.Body]:
        """Send every command, then collect every reply in order (errno replies raise)."""
        self._arm()
        ids = []
        for body in bodies:
            msg_id, data = self._encode(body, None, no_reply=False, fds=0)
            self._send(data, ())
            ids.append(msg_id)
        return [self._reply_body(self._wait_reply(msg_id)) for msg_id in ids]

    def _round_trip(
        self, body: vu.Body, command: vu.Command | None, fds: Sequence[int]
    ) -> vu.Body:
        msg_id, data = self._encode(body, command, no_reply=False, fds=len(fds))
        self._send(data, fds)
        return self._reply_body(self._wait_reply(msg_id))

    def _encode(
        self, body: vu.Body, command: vu.Command | None, *, no_reply: bool, fds: int
    ) -> tuple[int, bytes]:
        if self._sock is None:
            raise self._lost or VfioUserServerLost(f"{self.name}: the client is closed")
        return self.conn.send_command(body, command=command, no_reply=no_reply, fds=fds)

    def _reply_body(self, reply: vu.Received) -> vu.Body:
        _close_fds(reply.fds)  # this client asks for no mmap-able regions' descriptors
        if reply.is_error:
            raise VfioUserErrnoError(reply.command, reply.header.error_no)
        assert reply.body is not None
        return reply.body

    # -- I/O ----------------------------------------------------------------------------

    def _arm(self) -> None:
        self._deadline = time.monotonic() + self.timeout

    def _time_left(self, sock: socket.socket) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._lose(f"no answer within {self.timeout} s")
        sock.settimeout(left)

    def _send(self, data: bytes, fds: Sequence[int]) -> None:
        sock = self._sock
        assert sock is not None
        self._time_left(sock)
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = sock.sendmsg([data], ancillary)
            else:
                sent = sock.send(data)
            if sent < len(data):
                sock.sendall(data[sent:])
        except TimeoutError:
            raise self._lose(f"sending took longer than {self.timeout} s") from None
        except OSError as exc:
            raise self._lose(f"sending failed: {exc.strerror or exc}") from None

    def _wait_reply(self, msg_id: int) -> vu.Received:
        """Read until the reply to ``msg_id`` (answering server commands on the way)."""
        while True:
            for i, early in enumerate(self._early):
                if early.msg_id == msg_id:
                    return self._early.pop(i)
            event = self._next_event(block=True)
            assert event is not None
            if event.is_reply:
                if event.msg_id == msg_id:
                    return event
                self._early.append(event)  # pipelined: the caller asks for it next
            else:
                self._serve(event)

    def service_nowait(self) -> None:
        """Handle what the server sent unasked (DMA commands; a close) without blocking.

        Raises :class:`VfioUserServerLost` when the server has gone.
        """
        self._arm()
        while (event := self._next_event(block=False)) is not None:
            if event.is_reply:
                raise self._lose(f"a {event.command.name} reply to nothing was sent")
            self._serve(event)

    def _next_event(self, *, block: bool) -> vu.Received | None:
        while True:
            try:
                event = self.conn.next_event()
            except vu.MalformedMessageError as exc:
                _close_fds(exc.fds)
                if exc.reply_expected:
                    self._send(self.conn.send_error(exc.header, exc.errno), ())
                    continue
                raise self._lose(f"it sent a malformed message: {exc}") from None
            except vu.StreamBrokenError as exc:
                _close_fds(exc.fds)
                raise self._lose(f"it broke the protocol: {exc}") from None
            if event is not None:
                return event
            if not self._receive(block=block):
                return None

    def _receive(self, *, block: bool) -> bool:
        sock = self._sock
        if sock is None:
            raise self._lost or VfioUserServerLost(f"{self.name}: the client is closed")
        if not block:
            ready, _, _ = select.select([sock], [], [], 0)
            if not ready:
                return False
        self._time_left(sock)
        fd_room = socket.CMSG_SPACE(self.conn.limits.max_msg_fds * 4) or socket.CMSG_SPACE(4)
        try:
            data, ancillary, flags, _ = sock.recvmsg(_RECV_SIZE, fd_room)
        except TimeoutError:
            raise self._lose(f"no answer within {self.timeout} s") from None
        except OSError as exc:
            raise self._lose(f"receiving failed: {exc.strerror or exc}") from None
        fds = _fds_of(ancillary)
        if flags & socket.MSG_CTRUNC:
            _close_fds(fds)
            raise self._lose("it sent more descriptors than one message may carry")
        if not data:
            _close_fds(fds)
            raise self._lose("it closed the connection")
        self.conn.receive_data(data, fds)
        return True

    def _serve(self, command: vu.Received) -> None:
        """Answer a server-to-client command (DMA_READ/DMA_WRITE)."""
        _close_fds(command.fds)
        body = command.body
        answer: bytes | None = None
        if self.dma_handler is not None and body is not None:
            try:
                answer = self.dma_handler(body)
            except VfioUserErrnoError as exc:
                if not command.header.no_reply:
                    self._send(self.conn.send_error(command.header, exc.errno), ())
                return
        if command.header.no_reply:
            return
        if self.dma_handler is None:
            self._send(self.conn.send_error(command.header, errno.EFAULT), ())
        elif isinstance(body, vu.DmaAccess):
            self._send(self.conn.send_reply(
                command.header, vu.DmaData(body.address, answer or b"")), ())
        elif isinstance(body, vu.DmaData):
            self._send(self.conn.send_reply(
                command.header, vu.DmaWriteReply(body.address, body.count)), ())

    # -- conveniences -------------------------------------------------------------------

    def device_info(self) -> vu.DeviceInfo:
        reply = self.call(vu.DeviceInfoRequest())
        assert isinstance(reply, vu.DeviceInfo)
        return reply

    def region_info(self, index: int) -> vu.RegionInfo:
        """Region ``index``'s info, asking again with more room if capabilities did not fit."""
        reply = self.call(vu.RegionInfoRequest(index, 32))
        assert isinstance(reply, vu.RegionInfo)
        if not reply.complete:
            reply = self.call(vu.RegionInfoRequest(index, reply.argsz))
            assert isinstance(reply, vu.RegionInfo)
        return reply

    def irq_info(self, index: int) -> vu.IrqInfo:
        reply = self.call(vu.IrqInfoRequest(index))
        assert isinstance(reply, vu.IrqInfo)
        return reply

    def set_irqs(self, request: vu.SetIrqs, fds: Sequence[int] = ()) -> None:
        self.call(request, fds=fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.call(vu.RegionAccess(region, offset, count))
        assert isinstance(reply, vu.RegionData)
        if (reply.region, reply.offset, reply.count) != (region, offset, count):
            raise self._lose(
                f"it answered a read of {count} bytes at {offset:#x} of region {region} with "
                f"{reply.count} bytes at {reply.offset:#x} of region {reply.region}"
            )
        return reply.data

    def region_write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        body = vu.RegionData(region, offset, data)
        if posted:
            self.post(body)
        else:
            self.call(body)

    def reset(self) -> None:
        self.call(vu.Empty(), command=vu.Command.DEVICE_RESET)


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed: nothing more to release
