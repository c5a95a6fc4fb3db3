"""Frame transport over any trio byte stream (UNIX, TCP, TLS, vsock).

Framing comes from :mod:`shared.protocol._framing`, the one place it lives.
:class:`UnixFrameTransport` adds file-descriptor passing on UNIX sockets
(see :mod:`shared.transport._fdpass` for the rules).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

import trio

from shared.errors import LimitExceededError, RemoteProtocolError
from shared.protocol._framing import FRAME_HEADER, FrameDecoder, encode_frame
from shared.sync import ConflictDetector
from shared.transport._base import (
    DEFAULT_MAX_FRAME,
    RECEIVE_CONFLICT,
    SEND_CONFLICT,
    FrameTooLargeError,
    FrameTransport,
    TransportOptions,
)
from shared.transport._fdpass import (
    ANCILLARY_SPACE,
    RECVMSG_FLAGS,
    FdTracker,
    SendProgress,
    check_fds_argument,
    fds_from_ancillary,
    rights_message,
    rights_pieces,
    send_with_fds,
)
from shared.transport._identity import PeerIdentity, peercred_identity

__all__ = ["StreamFrameTransport", "UnixFrameTransport"]

_HEADER = FRAME_HEADER.size
#: A send that completes at once takes a scheduler pass only once per this many frames.
_YIELD_EVERY = 16

_RECEIVE_CHUNK = 65536


class StreamFrameTransport(FrameTransport):
    """Length-prefixed frames over a :class:`trio.abc.Stream`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        name: str = "",
        options: TransportOptions | None = None,
    ) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_frame_size)
        self.max_frame_size = max_frame_size
        self._name = name or type(stream).__name__
        # One sender and one receiver at a time (shared.sync.ConflictDetector). The
        # request path spells out its enter and exit on the detector's fields: a with
        # block would be two Python calls per frame there (see shared/sync/_conflict.py).
        self._send_conflicts = ConflictDetector(SEND_CONFLICT)
        self._receive_conflicts = ConflictDetector(RECEIVE_CONFLICT)
        self._eof = False
        self._closed = False
        self._broken: str | None = None
        # A server's limits on what this peer makes us hold (None: only the frame limit).
        self._limits = None if options is None else options.receive_limits(self._name)
        # Stays idle (busy is False) on transports that cannot receive fds.
        self._fd_tracker = FdTracker(self._name, limit=None if options is None else options.max_fds)
        # A plain socket (never TLS: its records are not ours to write) is written
        # directly first, see _send_encoded.
        self._direct: trio.socket.SocketType | None = (
            stream.socket if type(stream) is trio.SocketStream else None
        )
        self._sends = 0

    @property
    def stream(self) -> trio.abc.Stream:
        return self._stream

    def set_max_frame_size(self, size: int) -> None:
        self.max_frame_size = size
        self._decoder.max_frame_size = size

    def _check_send(self, frame: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this transport was closed")
        if len(frame) > self.max_frame_size:
            raise FrameTooLargeError(
                f"frame of {len(frame)} bytes exceeds the {self.max_frame_size}-byte limit; "
                "send smaller messages or negotiate a larger max_message_size"
            )
        if self._send_conflicts.held:
            raise self._send_conflicts.error()
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    async def send_frame(self, frame: bytes) -> None:
        self._check_send(frame)
        await self._send_encoded(encode_frame(frame))

    async def send_frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            self._check_send(frame)
        await self._send_encoded(b"".join([encode_frame(frame) for frame in frames]))

    def receive_frame_nowait(self) -> bytes | None:
        if self._closed or self._receive_conflicts.held or self._broken is not None:
            return None
        try:
            frame = self._decoder.next_frame()
        except RemoteProtocolError:
            return None  # the next receive_frame reports the broken framing
        if frame is not None:
            if self._fd_tracker.busy:
                self._fd_tracker.on_frame(_HEADER + len(frame))
            if self._limits is not None and self._limits.charged:
                self._limits.check(self._decoder.buffered)  # shrinking: never raises
        return frame

    async def _send_encoded(self, data: bytes) -> None:
        self._send_conflicts.held = True  # _check_send saw it free: no await since
        try:
            direct = self._direct
            if direct is not None:
                # One non-blocking write, then a cancellation point but no schedule
                # point: trio's send_all always ends with a pass through the
                # scheduler, in which the reader task would start reading the reply
                # the caller wants to read itself (one more pass per request). Only
                # when the socket buffer is full do we wait, through send_all.
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    sent = os.write(direct.fileno(), data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._broken = f"socket send failed: {exc.strerror or exc}"
                    raise _translate(exc, "send") from exc
                self._sends += 1
                if sent == len(data):
                    if self._sends % _YIELD_EVERY == 0:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return
                data = data[sent:]  # a torn frame from here on if cancelled (below)
            await self._stream.send_all(data)
        except trio.Cancelled:
            # A cancelled send_all may have written part of the frame; the byte stream
            # is now unframed. Never let the peer parse a torn frame as the start of
            # the next one: this transport is broken from here on.
            self._broken = "an earlier send was cancelled mid-frame; reconnect"
            await trio.aclose_forcefully(self._stream)
            raise
        finally:
            self._send_conflicts.held = False

    async def receive_frame(self) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("this transport was closed")
        receiving = self._receive_conflicts
        if receiving.held:
            raise receiving.error()
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        receiving.held = True
        try:
            while True:
                try:
                    frame = self._decoder.next_frame()
                except RemoteProtocolError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                if frame is not None:
                    if self._fd_tracker.busy:
                        self._fd_tracker.on_frame(_HEADER + len(frame))
                    if self._limits is not None and self._limits.charged:
                        self._limits.check(self._decoder.buffered)  # shrinking: never raises
                    return frame
                if self._eof:
                    raise trio.EndOfChannel("peer closed the connection")
                if not await self._receive_limited():
                    self._eof = True
                    if self._decoder.buffered:
                        raise trio.BrokenResourceError(
                            f"peer closed the connection in the middle of a frame "
                            f"({self._decoder.buffered} bytes of it arrived)"
                        )
                    raise trio.EndOfChannel("peer closed the connection")
        finally:
            receiving.held = False

    async def _receive_limited(self) -> bool:
        """:meth:`_receive_chunk` under the server's limits (idle partial frame, buffers)."""
        limits = self._limits
        if limits is None:
            return await self._receive_chunk()
        buffered = self._decoder.buffered
        try:
            if buffered and limits.idle_timeout is not None:
                with trio.move_on_after(limits.idle_timeout) as idle:
                    got = await self._receive_chunk()
                if idle.cancelled_caught:
                    raise limits.idle_error(buffered)
            else:
                got = await self._receive_chunk()
            limits.check(self._decoder.buffered)
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, LimitExceededError):
                self._broken = str(exc)
            raise
        return got

    async def _receive_chunk(self) -> bool:
        """Feed the next bytes from the stream to the decoder; False at end of stream."""
        data = await self._stream.receive_some(_RECEIVE_CHUNK)
        if not data:
            return False
        self._decoder.feed(data)
        return True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fd_tracker.close()
        if self._limits is not None:
            self._limits.release()
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

    def peer_identity(self) -> PeerIdentity:
        sock = self._socket()
        if sock is not None and sock.family == socket.AF_UNIX:
            return peercred_identity(sock, self._name)
        address: str | None = None
        if sock is not None:
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
            if isinstance(peer, tuple) and len(peer) >= 2:
                address = f"{peer[0]}:{peer[1]}"
        return PeerIdentity(self._name, address=address)

    def describe(self) -> str:
        return self._name


def _translate(exc: OSError, what: str) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:  # closed under us
        return trio.ClosedResourceError(f"the socket was closed during {what}")
    return trio.BrokenResourceError(f"socket {what} failed: {exc.strerror or exc}")


class UnixFrameTransport(StreamFrameTransport):
    """Frames over a UNIX stream socket, with file descriptors passed by SCM_RIGHTS.

    Every receive is a ``recvmsg`` with room for
    :data:`~shared.transport._fdpass.MAX_FDS_PER_FRAME` fds, so fds a peer
    attaches are never silently dropped; see :mod:`shared.transport._fdpass`
    for how they are tied to frames and when untaken ones are closed.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        name: str = "",
        options: TransportOptions | None = None,
    ) -> None:
        super().__init__(stream, max_frame_size=max_frame_size, name=name, options=options)
        self._sock = stream.socket

    @property
    def can_pass_fds(self) -> bool:
        return not self._closed

    async def _receive_chunk(self) -> bool:
        try:
            data, ancdata, flags, _ = await self._sock.recvmsg(
                _RECEIVE_CHUNK, ANCILLARY_SPACE, RECVMSG_FLAGS
            )
        except OSError as exc:
            raise _translate(exc, "receive") from exc
        if ancdata or flags & socket.MSG_CTRUNC:
            fds = fds_from_ancillary(ancdata, flags)
            self._decoder.feed(data)
            self._fd_tracker.on_chunk(self._decoder.buffered, fds)
            return bool(data)
        if not data:
            return False
        self._decoder.feed(data)
        return True

    def take_received_fds(self) -> list[int]:
        return self._fd_tracker.take()

    async def receive_frame_with_fds(self) -> tuple[bytes, list[int]]:
        """:meth:`receive_frame` and :meth:`take_received_fds` in one call.

        For a task that owns the receive side and wants the fds of every frame,
        frames without fds included (``shm:``'s control socket, where only
        some control frames may carry fds and any others must be closed): no
        other frame can come between the two. The caller owns the fds.
        """
        frame = await self.receive_frame()
        return frame, self._fd_tracker.take()

    def close_received_fds(self) -> None:
        """Close every fd held for the peer: untaken ones and ones waiting for their frame.

        For an owner whose receiving has ended for good (the peer said goodbye,
        died or broke a rule) but that closes the transport only later: by
        then nobody will ever take those fds (``shm:``'s liveness task).
        """
        self._fd_tracker.close()

    def send_frame_nowait(self, frame: bytes) -> bool:
        """Write one small frame now if the socket takes all of it; never waits.

        For a last word right before :meth:`aclose` (``shm:``'s goodbye), when
        waiting for a peer that does not read is not an option. Returns False
        when nothing was written: a send is running, the transport is closed
        or broken, the socket buffer is full or the peer is gone. A partial
        write breaks the transport (the byte stream is no longer framed).
        """
        if self._closed or self._send_conflicts.held or self._broken is not None:
            return False
        if len(frame) > self.max_frame_size:
            raise FrameTooLargeError(
                f"frame of {len(frame)} bytes exceeds the {self.max_frame_size}-byte limit"
            )
        data = encode_frame(frame)
        try:
            # os.write on the socket: trio's socket API has no synchronous send.
            sent = os.write(self._sock.fileno(), data)
        except OSError:
            return False  # full (EAGAIN) or the peer is gone: the caller's close says the rest
        if sent != len(data):
            self._broken = "a last frame was written only in part; reconnect"
            return False
        return True

    async def send_frame_with_fds(self, frame: bytes, fds: Sequence[int]) -> None:
        fd_list = check_fds_argument(fds)
        self._check_send(frame)
        data = encode_frame(frame)
        rights_pieces(data, fd_list)  # validates before anything is sent
        progress = SendProgress()
        sock = self._sock

        async def send_piece(piece: memoryview, group: list[int]) -> int:
            if group:
                return await sock.sendmsg([piece], rights_message(group))
            return await sock.send(piece)

        with self._send_conflicts:
            try:
                try:
                    await send_with_fds(send_piece, data, fd_list, progress)
                except OSError as exc:
                    self._broken = f"sending a frame with file descriptors failed: {exc}"
                    raise _translate(exc, "send") from exc
            except trio.Cancelled:
                if progress.sent:
                    # Part of the frame went out: the byte stream is unframed from here on.
                    self._broken = "an earlier send was cancelled mid-frame; reconnect"
                    await trio.aclose_forcefully(self._stream)
                raise
