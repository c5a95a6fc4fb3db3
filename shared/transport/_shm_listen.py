"""Connecting to and listening on ``shm:`` addresses (the transport is in ``_shm.py``)."""

from __future__ import annotations

import contextlib
import os
import socket

import trio

from shared.transport._base import FrameListener, TransportConnectError, TransportOptions
from shared.transport._shm import ShmTransport
from shared.transport._sockets import _remove_stale_socket, unix_connect_problem
from shared.transport._stream import _translate

__all__ = ["ShmListener", "connect_shm", "listen_shm"]


class ShmListener(FrameListener):
    """Accepts ``shm:`` connections on a UNIX socket path."""

    def __init__(self, sock: trio.socket.SocketType, path: str, options: TransportOptions) -> None:
        self._sock = sock
        self._path = path
        self._options = options
        self._inode = os.stat(path).st_ino
        self.address = f"shm:{path}"
        self._closed = False

    async def accept(self) -> ShmTransport:
        if self._closed:
            raise trio.ClosedResourceError("this shm listener was closed")
        try:
            conn, _ = await self._sock.accept()
        except OSError as exc:
            raise _translate(exc, "accept") from exc
        return ShmTransport(trio.SocketStream(conn), self._options, name=f"{self.address}(peer)")

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._sock.close()
        # Remove the path only if it is still ours (not a successor's socket).
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._path).st_ino == self._inode:
                os.unlink(self._path)
        await trio.lowlevel.checkpoint()


async def connect_shm(path: str, options: TransportOptions) -> ShmTransport:
    """Connect to ``shm:PATH``. Frames use the socket until :meth:`start_session`."""
    tsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await tsock.connect(path)
    except OSError as exc:
        tsock.close()
        raise TransportConnectError(unix_connect_problem(f"shm:{path}", path, exc)) from exc
    return ShmTransport(trio.SocketStream(tsock), options, name=f"shm:{path}")


async def listen_shm(path: str, options: TransportOptions) -> ShmListener:
    """Listen on ``shm:PATH`` (a stale socket file left by a dead server is replaced)."""
    _remove_stale_socket(path)
    tsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await tsock.bind(path)
        tsock.listen(128)
    except OSError as exc:
        tsock.close()
        raise TransportConnectError(f"cannot listen on shm:{path}: {exc.strerror or exc}") from exc
    return ShmListener(tsock, path, options)
