"""The vfio-user wire basics: command numbers, the 16-byte header, errors and limits.

Everything on the wire is little-endian (the specification says "host
endianness"; every host that speaks it today is little-endian, and a fixed
order keeps the codec testable anywhere).
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

from shared.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Command",
    "MessageType",
    "Header",
    "HEADER",
    "HEADER_SIZE",
    "FLAG_NO_REPLY",
    "FLAG_ERROR",
    "VfioUserLimits",
    "VfioUserProtocolError",
    "MalformedMessageError",
    "StreamBrokenError",
    "check",
]


class Command(enum.IntEnum):
    """The command numbers of the specification (14 is unused)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


#: Commands a server sends to its client (all others go client -> server).
SERVER_COMMANDS = frozenset({Command.DMA_READ, Command.DMA_WRITE})


class MessageType(enum.IntEnum):
    """Bits 0-3 of the header flags."""

    COMMAND = 0
    REPLY = 1


HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size  # 16
_TYPE_MASK = 0x0F
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
_KNOWN_FLAGS = _TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR


def check(condition: bool, message: str) -> None:
    """Raise :class:`LocalProtocolError` unless ``condition``: the validation of every message.

    A decoder turns it into :class:`MalformedMessageError`, so the same rule
    says both "you may not build this" and "the peer may not send this".
    """
    if not condition:
        raise LocalProtocolError(message)


@dataclass(frozen=True, slots=True)
class Header:
    """The 16-byte header every message starts with. ``size`` includes the header."""

    msg_id: int
    command: int
    size: int
    type: MessageType = MessageType.COMMAND
    no_reply: bool = False
    error: bool = False
    error_no: int = 0

    def __post_init__(self) -> None:
        check(0 <= self.msg_id <= 0xFFFF, f"message id {self.msg_id} is not a u16")
        check(0 <= self.command <= 0xFFFF, f"command {self.command} is not a u16")
        check(HEADER_SIZE <= self.size <= 0xFFFFFFFF, f"message size {self.size} is invalid")
        check(0 <= self.error_no <= 0xFFFFFFFF, f"errno {self.error_no} is not a u32")
        if self.type is MessageType.COMMAND:
            check(not self.error, "a command cannot carry the error flag")
        else:
            check(not self.no_reply, "a reply cannot carry the no-reply flag")

    @property
    def flags(self) -> int:
        """The flags word as sent."""
        return (
            int(self.type)
            | (FLAG_NO_REPLY if self.no_reply else 0)
            | (FLAG_ERROR if self.error else 0)
        )

    def pack(self) -> bytes:
        """The header's 16 bytes."""
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error_no)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Decode 16 bytes; a header no message may carry raises :class:`StreamBrokenError`."""
        msg_id, command, size, flags, error_no = HEADER.unpack_from(data)
        if flags & ~_KNOWN_FLAGS:
            raise StreamBrokenError(f"header flags {flags:#x} set reserved bits")
        try:
            kind = MessageType(flags & _TYPE_MASK)
        except ValueError:
            raise StreamBrokenError(
                f"header type {flags & _TYPE_MASK} is neither command nor reply"
            ) from None
        try:
            return cls(
                msg_id,
                command,
                size,
                kind,
                bool(flags & FLAG_NO_REPLY),
                bool(flags & FLAG_ERROR),
                error_no if kind is MessageType.REPLY else 0,
            )
        except LocalProtocolError as exc:
            raise StreamBrokenError(f"invalid header: {exc}") from None


class VfioUserProtocolError(RemoteProtocolError):
    """The vfio-user peer sent something the protocol forbids.

    ``fds`` are the file descriptors that arrived with the offending bytes:
    the codec never owns descriptors, so the caller closes them.
    ``errno`` is what a server answers for it.
    """

    def __init__(self, message: str, *, errno_value: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno_value
        self.fds: tuple[int, ...] = ()


class MalformedMessageError(VfioUserProtocolError):
    """One message was wrong, but its size was sound: the stream is still in step.

    A server answers it with an error reply carrying ``errno`` when
    ``reply_expected``; the connection goes on.
    """

    def __init__(
        self,
        message: str,
        *,
        header: Header,
        errno_value: int = errno.EINVAL,
    ) -> None:
        super().__init__(message, errno_value=errno_value)
        self.header = header

    @property
    def reply_expected(self) -> bool:
        """Whether the sender waits for an (error) reply to this message."""
        return self.header.type is MessageType.COMMAND and not self.header.no_reply


class StreamBrokenError(VfioUserProtocolError):
    """The byte stream cannot be trusted any more (a header with an impossible size,
    an oversize message, a protocol state violated): disconnect."""


@dataclass(frozen=True, slots=True)
class VfioUserLimits:
    """Hard limits of one endpoint: what it accepts, and so what it advertises.

    ``max_data_xfer_size`` and ``max_msg_fds`` are advertised in VERSION; the
    rest bound what a hostile peer can make the codec hold or parse.
    """

    #: Largest ``count`` of one region/DMA data transfer (the specification's default, 1 MiB).
    max_data_xfer_size: int = 1 << 20
    #: File descriptors accepted with one message.
    max_msg_fds: int = 8
    #: Commands awaiting replies at once (our own, on the sending side).
    max_in_flight: int = 1024
    #: Bytes of the VERSION JSON (with its NUL) and how deeply it may nest.
    max_json_size: int = 8192
    max_json_depth: int = 8
    #: Entries of one REGION_WRITE_MULTI, of a sparse-mmap capability, of an IO_FDS reply,
    #: and capabilities chained in one region info.
    max_write_multi: int = 2048
    max_sparse_areas: int = 1024
    max_io_fds_subregions: int = 1024
    max_region_caps: int = 16

    def __post_init__(self) -> None:
        check(4096 <= self.max_data_xfer_size <= 1 << 30, "max_data_xfer_size must be 4 KiB..1 GiB")
        check(0 <= self.max_msg_fds <= 253, "max_msg_fds must be 0..253 (SCM_MAX_FD)")
        check(1 <= self.max_in_flight <= 65536, "max_in_flight must be 1..65536")
        check(64 <= self.max_json_size <= 1 << 20, "max_json_size must be 64 B..1 MiB")
        check(2 <= self.max_json_depth <= 64, "max_json_depth must be 2..64")
        for name in ("max_write_multi", "max_sparse_areas", "max_io_fds_subregions",
                     "max_region_caps"):
            check(1 <= getattr(self, name) <= 65536, f"{name} must be 1..65536")

    @property
    def max_message_size(self) -> int:
        """The largest message accepted: a header, a 16-byte access header and one
        maximal data transfer, or the largest table a reply may hold."""
        tables = max(
            8 + 24 * self.max_write_multi,
            32 + 16 * self.max_region_caps + 8 + 16 * self.max_sparse_areas,
            16 + 40 * self.max_io_fds_subregions,
            4 + self.max_json_size,
        )
        return HEADER_SIZE + max(16 + self.max_data_xfer_size, tables)
