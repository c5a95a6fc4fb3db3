"""One vfio-user connection, sans-I/O, for either role.

The caller moves bytes and descriptors; the connection frames, decodes,
checks every rule and keeps the state:

- :meth:`VfioUserConnection.receive_data` takes bytes in any pieces, with the
  descriptors that arrived with them (SCM_RIGHTS); :meth:`next_event` returns
  each complete message as a :class:`Received`, or None when it needs more.
- ``send_*`` methods return the bytes to write (and the caller passes the
  descriptors it named along with them, in one ``sendmsg``).

Descriptors belong to the message whose bytes they arrived with: on a UNIX
stream socket the kernel delivers a ``sendmsg``'s descriptors together with
the first byte of its data and never merges two such sends into one read, so
a descriptor that arrived with byte ``p`` belongs to the message holding
``p``. The codec never opens or closes a descriptor: fds on a message the
codec refuses travel on the error (``exc.fds``) for the caller to close.

Message ids belong to their sender and may repeat; replies come in command
order, so a reply answers the oldest outstanding command with its id.
"""

from __future__ import annotations

import enum
import errno
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from shared.errors import LocalProtocolError
from shared.protocol.vfio_user._bodies import (
    REGION_FLAG_MMAP,
    DeviceInfo,
    DeviceInfoRequest,
    DmaMap,
    DmaUnmap,
    Empty,
    RegionInfo,
    RegionInfoRequest,
    RegionIoFds,
    RegionIoFdsRequest,
)
from shared.protocol.vfio_user._caps import Capabilities, Version, check_reply
from shared.protocol.vfio_user._irqs import IRQ_DATA_EVENTFD, IrqInfo, IrqInfoRequest, SetIrqs
from shared.protocol.vfio_user._transfer import (
    DeviceFeature,
    DmaAccess,
    DmaData,
    DmaWriteReply,
    MigData,
    MigDataRead,
    RegionAccess,
    RegionData,
    WriteMulti,
    WriteMultiReply,
)
from shared.protocol.vfio_user._wire import (
    HEADER_SIZE,
    SERVER_COMMANDS,
    Command,
    Header,
    MalformedMessageError,
    MessageType,
    StreamBrokenError,
    VfioUserLimits,
    VfioUserProtocolError,
    check,
)

__all__ = ["Role", "Body", "Received", "VfioUserConnection", "REQUEST_BODIES", "REPLY_BODIES"]

Body = Union[  # noqa: UP007 (a long alias reads better as a Union)
    Version, Empty, DmaMap, DmaUnmap, DeviceInfoRequest, DeviceInfo, RegionInfoRequest,
    RegionInfo, RegionIoFdsRequest, RegionIoFds, IrqInfoRequest, IrqInfo, SetIrqs,
    RegionAccess, RegionData, DmaAccess, DmaData, DmaWriteReply, WriteMulti, WriteMultiReply,
    DeviceFeature, MigDataRead, MigData,
]

#: The payload class of each command, and of its reply.
REQUEST_BODIES: dict[Command, type[Body]] = {
    Command.VERSION: Version,
    Command.DMA_MAP: DmaMap,
    Command.DMA_UNMAP: DmaUnmap,
    Command.DEVICE_GET_INFO: DeviceInfoRequest,
    Command.DEVICE_GET_REGION_INFO: RegionInfoRequest,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFdsRequest,
    Command.DEVICE_GET_IRQ_INFO: IrqInfoRequest,
    Command.DEVICE_SET_IRQS: SetIrqs,
    Command.REGION_READ: RegionAccess,
    Command.REGION_WRITE: RegionData,
    Command.DMA_READ: DmaAccess,
    Command.DMA_WRITE: DmaData,
    Command.DEVICE_RESET: Empty,
    Command.REGION_WRITE_MULTI: WriteMulti,
    Command.DEVICE_FEATURE: DeviceFeature,
    Command.MIG_DATA_READ: MigDataRead,
    Command.MIG_DATA_WRITE: MigData,
}
REPLY_BODIES: dict[Command, type[Body]] = {
    Command.VERSION: Version,
    Command.DMA_MAP: Empty,
    Command.DMA_UNMAP: DmaUnmap,
    Command.DEVICE_GET_INFO: DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: RegionInfo,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFds,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo,
    Command.DEVICE_SET_IRQS: Empty,
    Command.REGION_READ: RegionData,
    Command.REGION_WRITE: RegionAccess,
    Command.DMA_READ: DmaData,
    Command.DMA_WRITE: DmaWriteReply,
    Command.DEVICE_RESET: Empty,
    Command.REGION_WRITE_MULTI: WriteMultiReply,
    Command.DEVICE_FEATURE: DeviceFeature,
    Command.MIG_DATA_READ: MigData,
    Command.MIG_DATA_WRITE: Empty,
}
_COMMAND_OF = {cls: cmd for cmd, cls in REQUEST_BODIES.items() if cls is not Empty}


class Role(enum.Enum):
    """Which end of the socket this is."""

    CLIENT = "client"
    SERVER = "server"


class _State(enum.Enum):
    AWAIT_VERSION = "await-version"  # server: nothing yet; client: VERSION not sent
    VERSION_SENT = "version-sent"  # client: proposal out, reply awaited
    VERSION_RECEIVED = "version-received"  # server: proposal in, reply not yet sent
    READY = "ready"
    BROKEN = "broken"


#: The handshake, as a table: (role, state, what happened) -> next state. Anything
#: absent from the table is refused (by us: LocalProtocolError; by the peer: the
#: stream is broken).
_TRANSITIONS: dict[tuple[Role, _State, str], _State] = {
    (Role.CLIENT, _State.AWAIT_VERSION, "send VERSION"): _State.VERSION_SENT,
    (Role.CLIENT, _State.VERSION_SENT, "receive VERSION reply"): _State.READY,
    (Role.SERVER, _State.AWAIT_VERSION, "receive VERSION"): _State.VERSION_RECEIVED,
    (Role.SERVER, _State.VERSION_RECEIVED, "send VERSION reply"): _State.READY,
    (Role.SERVER, _State.VERSION_RECEIVED, "send VERSION error"): _State.AWAIT_VERSION,
}


@dataclass(frozen=True, slots=True)
class Received:
    """One complete message from the peer.

    ``body`` is None for an error reply (``header.error``; ``header.error_no`` is the
    errno). ``fds`` arrived with it; the receiver now owns them.
    """

    header: Header
    body: Body | None
    fds: tuple[int, ...] = ()

    @property
    def msg_id(self) -> int:
        return self.header.msg_id

    @property
    def command(self) -> Command:
        return Command(self.header.command)

    @property
    def is_reply(self) -> bool:
        return self.header.type is MessageType.REPLY

    @property
    def is_error(self) -> bool:
        return self.header.error


class VfioUserConnection:
    """The vfio-user protocol state of one socket, for the client or the server role."""

    def __init__(self, role: Role, limits: VfioUserLimits | None = None) -> None:
        self.role = role
        self.limits = limits or VfioUserLimits()
        self._state = _State.AWAIT_VERSION
        self._buf = bytearray()
        self._pos = 0  # stream offset of self._buf[0]
        self._fds: deque[tuple[int, int]] = deque()  # (stream offset, fd)
        self._next_id = 0
        self._outstanding: deque[tuple[int, Command]] = deque()
        self._proposal: Version | None = None
        #: The peer's capabilities, from the VERSION exchange.
        self.peer_caps = Capabilities()
        #: What this side advertised in VERSION.
        self.our_caps = Capabilities()

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``await-version``, ``version-sent``, ``version-received``, ``ready`` or ``broken``."""
        return self._state.value

    @property
    def in_flight(self) -> int:
        """Commands this side sent that still await their replies."""
        return len(self._outstanding)

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete message."""
        return len(self._buf)

    def take_held_fds(self) -> tuple[int, ...]:
        """Descriptors received with bytes of a message not yet complete.

        When the socket closes, the caller takes these and closes them (the
        codec never closes a descriptor).
        """
        fds = tuple(fd for _, fd in self._fds)
        self._fds.clear()
        return fds

    def _step(self, event: str) -> None:
        new = _TRANSITIONS.get((self.role, self._state, event))
        if new is None:
            raise LocalProtocolError(f"a {self.role.value} in state {self.state} cannot {event}")
        self._state = new

    def advertised(self, extra: Capabilities | None = None) -> Capabilities:
        """Our receive limits as capabilities, plus ``extra``'s other fields."""
        base = extra or Capabilities()
        return Capabilities(
            max_msg_fds=self.limits.max_msg_fds,
            max_data_xfer_size=self.limits.max_data_xfer_size,
            max_dma_maps=base.max_dma_maps,
            pgsizes=base.pgsizes,
            twin_socket_supported=base.twin_socket_supported,
            twin_socket_fd_index=base.twin_socket_fd_index,
            write_multiple=base.write_multiple,
            migration_pgsize=base.migration_pgsize,
        )

    # -- sending -------------------------------------------------------------------

    def send_command(
        self,
        body: Body,
        *,
        command: Command | None = None,
        no_reply: bool = False,
        fds: int = 0,
        msg_id: int | None = None,
    ) -> tuple[int, bytes]:
        """Encode a command; returns its message id and bytes. ``fds``: how many
        descriptors the caller sends with it. ``command`` is needed only for an
        :class:`Empty` body (DEVICE_RESET)."""
        cmd = command if command is not None else _COMMAND_OF.get(type(body))
        if cmd is None:
            raise LocalProtocolError(f"say which command carries a {type(body).__name__} body")
        if not isinstance(body, REQUEST_BODIES[cmd]):
            raise LocalProtocolError(f"{cmd.name} does not carry a {type(body).__name__}")
        if (cmd in SERVER_COMMANDS) != (self.role is Role.SERVER):
            raise LocalProtocolError(f"a {self.role.value} does not send {cmd.name}")
        if cmd is Command.VERSION:
            assert isinstance(body, Version)
            self._step("send VERSION")
            self._proposal = body
            self.our_caps = body.caps
        elif self._state is not _State.READY:
            raise LocalProtocolError(f"{cmd.name} before the VERSION handshake completed")
        if not no_reply and len(self._outstanding) >= self.limits.max_in_flight:
            raise LocalProtocolError(
                f"{len(self._outstanding)} commands already await replies "
                f"(max_in_flight {self.limits.max_in_flight})"
            )
        self._check_outgoing(cmd, MessageType.COMMAND, body, fds)
        if msg_id is None:
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
        data = self._frame(Header(msg_id, cmd, HEADER_SIZE, MessageType.COMMAND, no_reply), body)
        if not no_reply:
            self._outstanding.append((msg_id, cmd))
        return msg_id, data

    def send_reply(self, request: Header, body: Body, *, fds: int = 0) -> bytes:
        """Encode the reply to the command ``request`` (a VERSION reply completes the
        server's handshake)."""
        cmd = Command(request.command)
        if request.type is not MessageType.COMMAND or request.no_reply:
            raise LocalProtocolError("only a command that expects a reply gets one")
        if not isinstance(body, REPLY_BODIES[cmd]) and not (
            cmd is Command.DMA_UNMAP and isinstance(body, Empty)
        ):
            raise LocalProtocolError(f"a {cmd.name} reply does not carry a {type(body).__name__}")
        if cmd is Command.VERSION:
            assert isinstance(body, Version)
            self._step("send VERSION reply")
            self.our_caps = body.caps
        self._check_outgoing(cmd, MessageType.REPLY, body, fds)
        return self._frame(Header(request.msg_id, cmd, HEADER_SIZE, MessageType.REPLY), body)

    def send_error(self, request: Header, errno_value: int) -> bytes:
        """Encode an error reply (the header alone) to the command ``request``."""
        if request.type is not MessageType.COMMAND or request.no_reply:
            raise LocalProtocolError("only a command that expects a reply gets one")
        if request.command == Command.VERSION and self._state is _State.VERSION_RECEIVED:
            self._step("send VERSION error")
        return Header(
            request.msg_id, request.command, HEADER_SIZE, MessageType.REPLY,
            error=True, error_no=errno_value,
        ).pack()

    def _frame(self, header: Header, body: Body) -> bytes:
        payload = body.encode()
        size = HEADER_SIZE + len(payload)
        check(size <= 0xFFFFFFFF, "message too large")
        return Header(
            header.msg_id, header.command, size, header.type, header.no_reply
        ).pack() + payload

    def _check_outgoing(self, cmd: Command, kind: MessageType, body: Body, fds: int) -> None:
        limit = self.peer_caps.effective_max_msg_fds
        if self._state is not _State.READY:
            limit = max(limit, 1)
        if fds > limit:
            raise LocalProtocolError(f"{cmd.name} with {fds} fds; the peer accepts {limit}")
        low, high = _fd_rule(cmd, kind, body, fds)
        if not low <= fds <= high:
            raise LocalProtocolError(f"{cmd.name} must carry {low}..{high} fds, not {fds}")
        count = _transfer_count(cmd, kind, body)
        peer_max = self.peer_caps.effective_max_data_xfer_size
        if count > peer_max:
            raise LocalProtocolError(
                f"{cmd.name} moves {count} bytes; the peer's max_data_xfer_size is {peer_max}"
            )

    # -- receiving -----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Take bytes from the stream, with the descriptors that came with them."""
        at = self._pos + len(self._buf)
        for fd in fds:
            self._fds.append((at, fd))
        self._buf += data

    def next_event(self) -> Received | None:
        """The next complete message, or None until more bytes arrive.

        Raises :class:`MalformedMessageError` for a message that breaks a rule
        (the stream stays usable) and :class:`StreamBrokenError` when it does not.
        """
        if self._state is _State.BROKEN:
            raise self._broken("the connection is already broken")
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        try:
            header = Header.unpack(buf)
        except StreamBrokenError as exc:
            raise self._broken(str(exc)) from None
        if header.size > self.limits.max_message_size:
            raise self._broken(
                f"peer announced a {header.size}-byte message; the limit is "
                f"{self.limits.max_message_size} bytes"
            )
        if len(buf) < header.size:
            return None
        payload = bytes(buf[HEADER_SIZE:header.size])
        end = self._pos + header.size
        del buf[:header.size]
        self._pos = end
        fds = []
        while self._fds and self._fds[0][0] < end:
            fds.append(self._fds.popleft()[1])
        try:
            return self._accept(header, payload, tuple(fds))
        except VfioUserProtocolError as exc:
            exc.fds = tuple(fds)
            raise

    def _broken(self, why: str) -> StreamBrokenError:
        self._state = _State.BROKEN
        exc = StreamBrokenError(why)
        exc.fds = tuple(fd for _, fd in self._fds)
        self._fds.clear()
        self._buf.clear()
        return exc

    def _accept(self, header: Header, payload: bytes, fds: tuple[int, ...]) -> Received:
        try:
            cmd = Command(header.command)
        except ValueError:
            if self._state is not _State.READY:
                raise self._broken(f"unknown command {header.command} before VERSION") from None
            raise MalformedMessageError(
                f"unknown command {header.command}", header=header, errno_value=errno.ENOSYS
            ) from None
        if header.type is MessageType.REPLY:
            return self._accept_reply(cmd, header, payload, fds)
        if (cmd in SERVER_COMMANDS) != (self.role is Role.CLIENT):
            raise MalformedMessageError(
                f"a {self.role.value} does not receive {cmd.name} commands", header=header
            )
        if cmd is Command.VERSION:
            if self._state is _State.READY:
                raise MalformedMessageError("VERSION after the handshake", header=header)
            if self._state is not _State.AWAIT_VERSION:
                raise self._broken("a second VERSION before the first was answered")
        elif self._state is not _State.READY:
            raise self._broken(f"{cmd.name} before the VERSION handshake")
        body = self._decode(REQUEST_BODIES[cmd], header, payload)
        self._check_incoming(cmd, header, body, fds)
        if cmd is Command.VERSION:
            self._step("receive VERSION")
            assert isinstance(body, Version)
            self.peer_caps = body.caps
        return Received(header, body, fds)

    def _accept_reply(
        self, cmd: Command, header: Header, payload: bytes, fds: tuple[int, ...]
    ) -> Received:
        match = next((i for i, (mid, _) in enumerate(self._outstanding) if mid == header.msg_id),
                     None)
        if match is None:
            raise self._broken(f"a {cmd.name} reply to message {header.msg_id}, which awaits none")
        sent = self._outstanding[match][1]
        if sent is not cmd:
            raise self._broken(
                f"the reply to message {header.msg_id} says {cmd.name}; the command was {sent.name}"
            )
        del self._outstanding[match]
        if header.error:
            if payload or fds:
                raise self._broken(f"an error reply to {cmd.name} carries a payload or fds")
            if cmd is Command.VERSION:
                raise self._broken(
                    f"the server refused the VERSION proposal (errno {header.error_no})"
                )
            return Received(header, None, ())
        cls: type[Body] = REPLY_BODIES[cmd]
        if cmd is Command.DMA_UNMAP and not payload:
            cls = Empty
        body = self._decode(cls, header, payload)
        self._check_incoming(cmd, header, body, fds)
        if cmd is Command.VERSION:
            assert isinstance(body, Version) and self._proposal is not None
            try:
                check_reply(self._proposal, body, twin_fds=len(fds))
            except LocalProtocolError as exc:
                raise self._broken(f"VERSION reply: {exc}") from None
            self._step("receive VERSION reply")
            self.peer_caps = body.caps
        return Received(header, body, fds)

    def _decode(self, cls: type[Body], header: Header, payload: bytes) -> Body:
        try:
            return cls.decode(payload, self.limits)
        except LocalProtocolError as exc:
            if header.command == Command.VERSION and header.type is MessageType.REPLY:
                raise self._broken(f"VERSION reply: {exc}") from None
            raise MalformedMessageError(
                f"{Command(header.command).name}: {exc}", header=header
            ) from None

    def _check_incoming(
        self, cmd: Command, header: Header, body: Body, fds: tuple[int, ...]
    ) -> None:
        if len(fds) > self.limits.max_msg_fds:
            raise MalformedMessageError(
                f"{cmd.name} came with {len(fds)} fds; the limit is {self.limits.max_msg_fds}",
                header=header,
            )
        low, high = _fd_rule(cmd, header.type, body, len(fds))
        if not low <= len(fds) <= high:
            raise MalformedMessageError(
                f"{cmd.name} must come with {low}..{high} fds, not {len(fds)}", header=header
            )
        count = _transfer_count(cmd, header.type, body)
        if count > self.limits.max_data_xfer_size:
            raise MalformedMessageError(
                f"{cmd.name} moves {count} bytes; max_data_xfer_size is "
                f"{self.limits.max_data_xfer_size}",
                header=header,
            )
        if (
            cmd is Command.REGION_WRITE_MULTI
            and header.type is MessageType.COMMAND
            and not (self.our_caps.write_multiple and self.peer_caps.write_multiple)
        ):
            raise MalformedMessageError(
                    "REGION_WRITE_MULTI without write_multiple agreed in VERSION",
                    header=header, errno_value=errno.ENOTSUP,
                )


def _fd_rule(cmd: Command, kind: MessageType, body: Body, count: int) -> tuple[int, int]:
    """How many descriptors a message may carry: (least, most)."""
    if kind is MessageType.COMMAND:
        if cmd is Command.DMA_MAP:
            return 0, 1
        if isinstance(body, SetIrqs) and body.data_type == IRQ_DATA_EVENTFD:
            # The eventfds for [start, start + count), or none to de-assign them.
            return (0, 0) if count == 0 else (body.count, body.count)
        return 0, 0
    if isinstance(body, Version):
        caps = body.caps
        if caps.twin_socket_supported and caps.twin_socket_fd_index is not None:
            return caps.twin_socket_fd_index + 1, 253
        return 0, 0
    if isinstance(body, RegionInfo):
        return 0, (1 if body.flags & REGION_FLAG_MMAP else 0)
    if isinstance(body, RegionIoFds):
        need = body.fds_needed
        return (need, 253) if need else (0, 0)
    return 0, 0


def _transfer_count(cmd: Command, kind: MessageType, body: Body) -> int:
    """The data size a message moves, checked against ``max_data_xfer_size``."""
    if isinstance(body, (RegionAccess, RegionData, DmaData)):
        return body.count
    if isinstance(body, DmaAccess):
        return body.count
    if isinstance(body, (MigData,)):
        return len(body.data)
    if isinstance(body, MigDataRead):
        return body.size
    return 0
