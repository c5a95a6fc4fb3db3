"""Length-prefixed framing for byte-stream transports (the one place framing lives).

A frame on a stream is a 4-byte little-endian payload length followed by the
payload. ``FrameDecoder`` is sans-I/O: feed it bytes, take complete frames.
"""

from __future__ import annotations

import struct

from shared.errors import RemoteProtocolError

__all__ = ["FRAME_HEADER", "encode_frame", "FrameDecoder"]

FRAME_HEADER = struct.Struct("<I")


def encode_frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length."""
    return FRAME_HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Reassembles frames from stream bytes, enforcing ``max_frame_size``.

    An announced length over the limit raises :class:`RemoteProtocolError`
    *before* any payload is buffered, so a hostile peer cannot make us hold
    more than one maximum-size frame.
    """

    __slots__ = ("_buf", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        self._buf = bytearray()
        self.max_frame_size = max_frame_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Return the next complete frame, or None if more bytes are needed."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = FRAME_HEADER.unpack_from(buf)
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                f"peer announced a {length}-byte frame; the limit is {self.max_frame_size} bytes"
            )
        end = 4 + length
        if len(buf) < end:
            return None
        frame = bytes(buf[4:end])
        del buf[:end]
        return frame

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)
