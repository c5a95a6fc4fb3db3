"""Frame transport over any trio byte stream (UNIX, TCP, TLS, vsock).

Framing comes from :mod:`shared.protocol._framing`, the one place it lives.
"""

from __future__ import annotations

import socket
from typing import Any

import trio

from shared.errors import RemoteProtocolError
from shared.protocol._framing import FrameDecoder, encode_frame
from shared.transport._base import DEFAULT_MAX_FRAME, FrameTooLargeError, FrameTransport

__all__ = ["StreamFrameTransport"]

_RECEIVE_CHUNK = 65536


class StreamFrameTransport(FrameTransport):
    """Length-prefixed frames over a :class:`trio.abc.Stream`."""

    def __init__(
        self, stream: trio.abc.Stream, *, max_frame_size: int = DEFAULT_MAX_FRAME, name: str = ""
    ) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_frame_size)
        self.max_frame_size = max_frame_size
        self._name = name or type(stream).__name__
        self._send_busy = False
        self._receive_busy = False
        self._eof = False
        self._closed = False
        self._broken: str | None = None

    @property
    def stream(self) -> trio.abc.Stream:
        return self._stream

    def set_max_frame_size(self, size: int) -> None:
        self.max_frame_size = size
        self._decoder.max_frame_size = size

    async def send_frame(self, frame: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this transport was closed")
        if len(frame) > self.max_frame_size:
            raise FrameTooLargeError(
                f"frame of {len(frame)} bytes exceeds the {self.max_frame_size}-byte limit; "
                "send smaller messages or negotiate a larger max_message_size"
            )
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this transport")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        self._send_busy = True
        try:
            await self._stream.send_all(encode_frame(frame))
        except trio.Cancelled:
            # A cancelled send_all may have written part of the frame; the byte stream
            # is now unframed. Never let the peer parse a torn frame as the start of
            # the next one: this transport is broken from here on.
            self._broken = "an earlier send was cancelled mid-frame; reconnect"
            await trio.aclose_forcefully(self._stream)
            raise
        finally:
            self._send_busy = False

    async def receive_frame(self) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("this transport was closed")
        if self._receive_busy:
            raise trio.BusyResourceError("another task is already receiving on this transport")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        self._receive_busy = True
        try:
            while True:
                try:
                    frame = self._decoder.next_frame()
                except RemoteProtocolError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                if frame is not None:
                    return frame
                if self._eof:
                    raise trio.EndOfChannel("peer closed the connection")
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    self._eof = True
                    if self._decoder.buffered:
                        raise trio.BrokenResourceError(
                            f"peer closed the connection in the middle of a frame "
                            f"({self._decoder.buffered} bytes of it arrived)"
                        )
                    raise trio.EndOfChannel("peer closed the connection")
                self._decoder.feed(data)
        finally:
            self._receive_busy = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._broken is not None:
            await trio.aclose_forcefully(self._stream)
        else:
            await self._stream.aclose()

    def _socket(self) -> trio.socket.SocketType | None:
        sock = getattr(self._stream, "socket", None)
        if sock is None:
            inner = getattr(self._stream, "transport_stream", None)
            sock = getattr(inner, "socket", None)
        return sock

    def peer_identity(self) -> dict[str, Any]:
        sock = self._socket()
        info: dict[str, Any] = {"transport": self._name}
        if sock is not None and sock.family == socket.AF_UNIX:
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            except OSError as exc:
                info["peercred_error"] = str(exc)
            else:
                pid, uid, gid = (
                    int.from_bytes(creds[0:4], "little"),
                    int.from_bytes(creds[4:8], "little"),
                    int.from_bytes(creds[8:12], "little"),
                )
                info.update(pid=pid, uid=uid, gid=gid)
        elif sock is not None:
            try:
                info["peer"] = sock.getpeername()
            except OSError as exc:
                info["peer_error"] = str(exc)
        return info

    def describe(self) -> str:
        return self._name
