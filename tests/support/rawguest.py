"""A hand-driven frontend for backend interrupt and DMA tests.

It speaks the protocol through a raw :class:`Connection` over any transport,
keeps interrupt and fault events in lists (and a channel), and answers the
backend's DMA calls from local buffers, bounds-checked, like a frontend must.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from pciback.testing import TEST_TOKEN
from shared.errors import ErrorCode
from shared.protocol import (
    Connection,
    DmaCallResult,
    DmaFaultEvent,
    DmaReadCall,
    DmaWriteCall,
    ErrorReply,
    Event,
    InterruptEvent,
    Limits,
    Reply,
    Request,
    Role,
    Welcome,
)
from shared.transport import FrameTransport, TransportOptions, open_transport

EDU = 0  # packed address of the first device on a guest's bus (0000:00:00.0)

# edu registers
ID, FACTORIAL, STATUS, IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x00, 0x08, 0x20, 0x24, 0x60, 0x64
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_BUFFER = 0x40000


class RawGuest:
    """One guest connection driven by hand (see the module docstring)."""

    def __init__(self, transport: FrameTransport, conn: Connection) -> None:
        self.transport = transport
        self.conn = conn
        self.interrupts: list[InterruptEvent] = []
        self.faults: list[DmaFaultEvent] = []
        self.calls: list[Event] = []
        self.buffers: dict[int, bytearray] = {}  # bus address -> local memory (message DMA)
        self.answer_calls = True
        self.arrived = trio.lowlevel.ParkingLot()
        self._waiting: dict[int, trio.Event] = {}
        self._replies: dict[int, Reply] = {}
        self._lock = trio.Lock()

    async def _send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        async with self._lock:
            if fds:
                await self.transport.send_frame_with_fds(frame, fds)
            else:
                await self.transport.send_frame(frame)

    async def request(self, make: Callable[[int], Request], fds: Sequence[int] = ()) -> Reply:
        rid = self.conn.next_request_id()
        done = self._waiting[rid] = trio.Event()
        await self._send(self.conn.send(make(rid)), fds)
        await done.wait()
        del self._waiting[rid]
        return self._replies.pop(rid)

    async def ok(self, make: Callable[[int], Request], fds: Sequence[int] = ()) -> Reply:
        reply = await self.request(make, fds)
        assert not isinstance(reply, ErrorReply), reply
        return reply

    async def wait_interrupts(self, n: int) -> list[InterruptEvent]:
        """Wait until at least ``n`` interrupt events arrived in total."""
        while len(self.interrupts) < n:
            await self.arrived.park()
        return self.interrupts

    async def wait_faults(self, n: int) -> list[DmaFaultEvent]:
        while len(self.faults) < n:
            await self.arrived.park()
        return self.faults

    def _locate(self, address: int, length: int) -> tuple[bytearray, int] | None:
        for base, buf in self.buffers.items():
            if base <= address and address + length <= base + len(buf):
                return buf, address - base
        return None

    async def _answer(self, call: DmaReadCall | DmaWriteCall) -> None:
        length = call.length if isinstance(call, DmaReadCall) else len(call.data)
        found = self._locate(call.bus_address, length)
        if found is None:
            result = DmaCallResult(call.call_id, ErrorCode.DMA_FAULT, b"")
        else:
            buf, off = found
            if isinstance(call, DmaReadCall):
                result = DmaCallResult(call.call_id, ErrorCode.OK, bytes(buf[off : off + length]))
            else:
                buf[off : off + length] = call.data
                result = DmaCallResult(call.call_id, ErrorCode.OK, b"")
        await self._send(self.conn.send(result))

    async def run(self) -> None:
        try:
            while True:
                msg = self.conn.receive(await self.transport.receive_frame())
                if isinstance(msg, Reply):
                    self._replies[msg.request_id] = msg
                    self._waiting[msg.request_id].set()
                elif isinstance(msg, InterruptEvent):
                    self.interrupts.append(msg)
                elif isinstance(msg, DmaFaultEvent):
                    self.faults.append(msg)
                elif isinstance(msg, DmaReadCall | DmaWriteCall):
                    self.calls.append(msg)
                    if self.answer_calls:
                        await self._answer(msg)
                self.arrived.unpark_all()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            return


@asynccontextmanager
async def raw_guest(address: str, guest: str) -> AsyncIterator[RawGuest]:
    transport = await open_transport(address, TransportOptions())
    async with transport:
        conn = Connection(Role.CLIENT, limits=Limits(max_message_size=1 << 21), guest=guest)
        await transport.send_frame(conn.hello(TEST_TOKEN))
        welcome = conn.receive(await transport.receive_frame())
        assert isinstance(welcome, Welcome), welcome
        frame_size = min(conn.limits.max_message_size, conn.peer_limits.max_message_size)
        transport.set_max_frame_size(frame_size)
        await transport.start_session(is_server=False, max_frame_size=frame_size)
        client = RawGuest(transport, conn)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            yield client
            nursery.cancel_scope.cancel()


def sealed_memfd(size: int) -> int:
    """A memfd of ``size`` bytes sealed against shrinking (what shared DMA needs)."""
    import fcntl

    fd = os.memfd_create("guest-dma", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd
