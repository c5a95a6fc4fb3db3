"""In-process frame transports for tests: a connected pair and named listeners."""

from __future__ import annotations

import math

import trio

from shared.sync import ConflictDetector
from shared.transport._base import (
    DEFAULT_MAX_FRAME,
    RECEIVE_CONFLICT,
    SEND_CONFLICT,
    FrameListener,
    FrameTooLargeError,
    FrameTransport,
    TransportAddressError,
    TransportConnectError,
)
from shared.transport._identity import PeerIdentity, own_process_identity

__all__ = ["MemoryTransport", "memory_transport_pair", "MemoryListener"]

#: Frames buffered per direction before ``send_frame`` waits (back-pressure).
DEFAULT_BUFFER = 16


class MemoryTransport(FrameTransport):
    """One end of an in-memory pair built on bounded trio memory channels."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        *,
        max_frame_size: int,
        name: str,
    ) -> None:
        self._send = send
        self._receive = receive
        self.max_frame_size = max_frame_size
        self._name = name
        self._closed = False
        self._send_conflicts = ConflictDetector(SEND_CONFLICT)
        self._receive_conflicts = ConflictDetector(RECEIVE_CONFLICT)

    async def send_frame(self, frame: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this transport was closed")
        if len(frame) > self.max_frame_size:
            raise FrameTooLargeError(
                f"frame of {len(frame)} bytes exceeds the {self.max_frame_size}-byte limit"
            )
        with self._send_conflicts:
            await self._send.send(bytes(frame))

    async def receive_frame(self) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("this transport was closed")
        with self._receive_conflicts:
            return await self._receive.receive()

    def receive_frame_nowait(self) -> bytes | None:
        if self._closed or self._receive_conflicts.held:
            return None
        try:
            return self._receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return None  # nothing buffered, or the next receive_frame reports the end

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._send.aclose()
        await self._receive.aclose()

    def describe(self) -> str:
        return self._name

    def peer_identity(self) -> PeerIdentity:
        # Both ends live in this process: the peer has exactly our credentials.
        return own_process_identity(self._name)


def memory_transport_pair(
    *, max_frame_size: int = DEFAULT_MAX_FRAME, buffer: int = DEFAULT_BUFFER, name: str = "memory"
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected in-memory transports (client end, server end)."""
    size: int | float = math.inf if buffer < 0 else buffer
    a_send, b_receive = trio.open_memory_channel[bytes](size)
    b_send, a_receive = trio.open_memory_channel[bytes](size)
    return (
        MemoryTransport(a_send, a_receive, max_frame_size=max_frame_size, name=f"{name}(client)"),
        MemoryTransport(b_send, b_receive, max_frame_size=max_frame_size, name=f"{name}(server)"),
    )


_LISTENERS: dict[str, MemoryListener] = {}


class MemoryListener(FrameListener):
    """A named in-process listener: ``memory:NAME`` addresses connect to it."""

    def __init__(self, name: str, *, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        if not name:
            raise TransportAddressError("memory: addresses need a name, e.g. memory:backend0")
        if name in _LISTENERS:
            raise TransportAddressError(f"memory:{name} is already listening; pick another name")
        self.name = name
        self.address = f"memory:{name}"
        self.max_frame_size = max_frame_size
        self._pending_send, self._pending = trio.open_memory_channel[MemoryTransport](math.inf)
        _LISTENERS[name] = self

    async def accept(self) -> FrameTransport:
        try:
            return await self._pending.receive()
        except trio.EndOfChannel as exc:  # pragma: no cover - we never close the send side early
            raise trio.ClosedResourceError("listener closed") from exc

    def _connect(self) -> MemoryTransport:
        client, server = memory_transport_pair(
            max_frame_size=self.max_frame_size, name=self.address
        )
        try:
            self._pending_send.send_nowait(server)
        except trio.ClosedResourceError as exc:
            raise trio.BrokenResourceError(f"{self.address} stopped listening") from exc
        return client

    async def aclose(self) -> None:
        if _LISTENERS.get(self.name) is self:
            del _LISTENERS[self.name]
        self._pending_send.close()
        self._pending.close()


async def connect_memory(name: str, max_frame_size: int) -> MemoryTransport:
    listener = _LISTENERS.get(name)
    if listener is None:
        raise TransportConnectError(
            f"nothing listens on memory:{name}; start the in-process backend first"
        )
    await trio.lowlevel.checkpoint()
    client = listener._connect()
    client.max_frame_size = max_frame_size
    return client
