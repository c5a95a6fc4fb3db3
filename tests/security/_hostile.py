"""An attacker's toolkit: raw frames, raw stream bytes, and a decoder that expects nothing.

The attacker never uses :class:`shared.protocol.Connection` to send (it would
refuse to build what an attacker sends); frames are msgpack arrays packed by
hand. Received frames are decoded with :func:`shared.protocol.decode` only to
look at them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio

from shared.errors import PcisplitError
from shared.protocol import (
    PROTOCOL_VERSION,
    ErrorReply,
    Goodbye,
    HandshakeRejected,
    Message,
    Welcome,
    decode,
    encode_frame,
)
from shared.transport import FrameTransport, TransportOptions, open_transport

ATTACKER = "guest1"
FEATURES = ("bus-snapshot", "config-access", "bar-access", "reset", "ping", "interrupts", "dma")

# Wire tags (shared/protocol/_messages.py).
HELLO, GOODBYE = 0x01, 0x04
PING, SNAPSHOT, CFG_READ, CFG_WRITE, BAR_READ, BAR_WRITE, RESET = range(0x10, 0x17)
IRQ_ENABLE, IRQ_DISABLE, IRQ_EOI, IRQ_MASK, DMA_MAP, DMA_UNMAP = range(0x17, 0x1D)
DMA_RESULT = 0x80

# The attacker's bus (guest1): edu1 then msix1, packed wire addresses.
EDU1 = 0x0000
MSIX1 = 0x0008


def pack(*fields: Any) -> bytes:
    """One message payload: a msgpack array, exactly as given."""
    return bytes(msgpack.packb(list(fields), use_bin_type=True))


def guest_token(guest: str) -> bytes:
    """The token each guest of the suite's backend has (its ``token_file``; used over tcp)."""
    return f"sec-suite-token-{guest}-0000".encode()


def hello(
    guest: str = ATTACKER,
    *,
    max_message_size: int = 65536,
    max_in_flight: int = 64,
    version: tuple[int, int] = PROTOCOL_VERSION,
    features: Sequence[str] = FEATURES,
) -> bytes:
    limits = [max_message_size, max_in_flight]
    token = guest_token(guest) if isinstance(guest, str) else b""
    return pack(HELLO, version[0], version[1], list(features), limits, guest, token)


def goodbye(code: int = 0, message: str = "bye") -> bytes:
    return pack(GOODBYE, code, message)


def split_host(address: str) -> tuple[str, str | int]:
    """``("unix", path)`` for unix:/shm:, ``("tcp", port)`` for tcp://."""
    scheme, _, rest = address.partition(":")
    if scheme in ("unix", "shm"):
        return "unix", rest
    _host, _, port = rest.removeprefix("//").rpartition(":")
    return "tcp", int(port)


class Peer:
    """A framed connection whose every frame the attacker chooses."""

    def __init__(self, transport: FrameTransport) -> None:
        self.transport = transport
        self.received: list[Message] = []
        #: The backend hung up while we were still sending (a fine answer to an attack).
        self.send_refused = False

    async def send(self, payload: bytes) -> None:
        try:
            await self.transport.send_frame(payload)
        except trio.BrokenResourceError:
            self.send_refused = True

    async def send_many(self, payloads: Sequence[bytes]) -> None:
        """Several frames in one write (one batch on shm:), as a pipelining peer sends them."""
        try:
            await self.transport.send_frames(list(payloads))
        except trio.BrokenResourceError:
            self.send_refused = True

    async def receive(self, timeout: float = 5.0) -> Message:
        with trio.fail_after(timeout):
            frame = await self.transport.receive_frame()
        msg = decode(frame, max_size=1 << 24)
        self.received.append(msg)
        return msg

    async def handshake(self, guest: str = ATTACKER, **hello_args: Any) -> Welcome:
        await self.send(hello(guest, **hello_args))
        msg = await self.receive()
        assert isinstance(msg, Welcome), f"handshake answered with {msg!r}"
        # Both ends size the transport for the smaller limit (Connection.frame_size).
        ours = hello_args.get("max_message_size", 65536)
        self.transport.set_max_frame_size(min(ours, msg.limits.max_message_size))
        await self.transport.start_session(
            is_server=False, max_frame_size=self.transport.max_frame_size
        )
        return msg

    async def request(self, payload: bytes, timeout: float = 5.0) -> Message:
        """Send one frame and return the next message that is a reply (or Goodbye)."""
        await self.send(payload)
        while True:
            msg = await self.receive(timeout)
            if not msg.TAG >= 0x60:  # events and calls are not answers
                return msg

    async def answer(self, payload: bytes, request_id: int, timeout: float = 10.0) -> Message:
        """Send ``payload`` and skip everything until the reply to ``request_id`` comes."""
        await self.send(payload)
        with trio.fail_after(timeout):
            while True:
                msg = await self.receive(timeout)
                if getattr(msg, "request_id", None) == request_id or isinstance(msg, Goodbye):
                    return msg

    async def replies(self, count: int, timeout: float = 10.0) -> list[Message]:
        """The next ``count`` replies (events and calls in between are skipped)."""
        got: list[Message] = []
        with trio.fail_after(timeout):
            while len(got) < count:
                msg = await self.receive(timeout)
                if msg.TAG < 0x60:
                    got.append(msg)
        return got

    async def until_closed(self, timeout: float = 10.0) -> list[Message]:
        """Read until the backend closes the connection; returns what came before.

        Fails if the backend keeps the connection open for ``timeout`` seconds.
        """
        got: list[Message] = []
        with trio.fail_after(timeout):
            while True:
                try:
                    frame = await self.transport.receive_frame()
                except (trio.EndOfChannel, trio.BrokenResourceError):
                    return got
                try:
                    got.append(decode(frame, max_size=1 << 24))
                except PcisplitError:
                    continue

    async def aclose(self) -> None:
        await self.transport.aclose()


@asynccontextmanager
async def peer(address: str, *, handshake: bool = False, **hello_args: Any) -> AsyncIterator[Peer]:
    """A raw framed connection to ``address`` (optionally after a normal Hello as guest1)."""
    transport = await open_transport(address, TransportOptions(max_frame_size=1 << 24))
    p = Peer(transport)
    try:
        if handshake:
            await p.handshake(**hello_args)
        yield p
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


async def open_raw_socket(address: str) -> trio.SocketStream:
    """A plain byte stream to ``address`` (the socket a unix:/shm:/tcp:// listener accepts)."""
    family, where = split_host(address)
    if family == "unix":
        return await trio.open_unix_socket(str(where))
    return await trio.open_tcp_stream("127.0.0.1", int(where))


async def raw_handshake(stream: trio.SocketStream, guest: str = ATTACKER) -> None:
    """The Hello/Welcome exchange over raw stream bytes (unix: and tcp:// only)."""
    await stream.send_all(encode_frame(hello(guest)))
    data = b""
    with trio.fail_after(5):
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
            chunk = await stream.receive_some()
            assert chunk, "backend closed during the handshake"
            data += chunk
    msg = decode(data[4 : 4 + int.from_bytes(data[:4], "little")], max_size=1 << 24)
    assert isinstance(msg, Welcome), msg


async def stream_closed(stream: trio.SocketStream, timeout: float = 10.0) -> bytes:
    """Read until EOF (the backend hung up); returns the bytes that came first."""
    data = b""
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await stream.receive_some()
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


def is_error(msg: Message, *codes: int) -> bool:
    return isinstance(msg, ErrorReply) and (not codes or int(msg.code) in codes)


def is_refusal(msg: Message) -> bool:
    return isinstance(msg, HandshakeRejected | Goodbye)


async def find_devices(p: Peer) -> dict[int, int]:
    """The attacker's bus: PCI device id -> packed address (edu 0x11e8, sec-msix 0x5ec0)."""
    reply = await p.request(pack(SNAPSHOT, 0xFFFF0000, False))
    devices = getattr(reply, "devices", None)
    assert devices is not None, reply
    return {d.device_id: d.address for d in devices}


def ok(msg: Message) -> Message:
    """``msg``, after checking it is a successful reply."""
    assert not isinstance(msg, ErrorReply | Goodbye), msg
    return msg
