"""The guest DMA API: shared memfds on unix:, DMA call messages elsewhere, and faults.

The round trips run against the real backend (in process) driving edu's DMA
engine; the bounds checks of the frontend's call answers run against a fake
backend built from a raw server :class:`Connection`, because a correct
backend never sends a call outside the guest's windows.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import pcifront
from pciback.testing import TEST_TOKEN, running_backend
from shared.errors import ErrorCode
from shared.protocol import (
    Connection,
    DeviceInfo,
    DmaCallResult,
    DmaFaultEvent,
    DmaMapRequest,
    DmaReadCall,
    DmaUnmapRequest,
    DmaWriteCall,
    DoneReply,
    InterruptEvent,
    Limits,
    Message,
    PingRequest,
    Request,
    Role,
    SnapshotReply,
    SnapshotRequest,
    ValueReply,
)
from shared.transport import FrameTransport, open_listener
from tests.support.configs import ONE_GUEST

ROOT = Path(__file__).resolve().parents[2]
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD, EDU_BUFFER = 0x80, 0x88, 0x90, 0x98, 0x40000
IRQ_ACK = 0x64


async def edu_dma(
    dev: pcifront.Device, irqs: pcifront.Interrupts, src: int, dst: int, n: int, cmd: int
) -> None:
    await dev.bar_write(0, DMA_SRC, 8, src)
    await dev.bar_write(0, DMA_DST, 8, dst)
    await dev.bar_write(0, DMA_COUNT, 8, n)
    await dev.bar_write(0, DMA_CMD, 8, cmd)
    with trio.fail_after(10):
        await irqs.receive()
    await dev.bar_write(0, IRQ_ACK, 4, 0x100)


@pytest.mark.parametrize("kind", ["unix", "memory", "tcp"])
async def test_dma_round_trip_through_edu(kind: str, tmp_path: Path) -> None:
    async with running_backend(ONE_GUEST, transports=(kind,), tmp=tmp_path) as rb:
        async with pcifront.connect(rb.address(kind), guest="guest0", token=TEST_TOKEN) as bus:
            dev = bus.devices[0]
            async with dev.interrupts(mode="msi") as irqs, await bus.dma_map(8192) as buf:
                assert buf.shared is (kind == "unix")
                assert buf.bus_address and buf.bus_address % 4096 == 0
                data = bytes(range(256)) * 4
                buf.write(100, data)
                await edu_dma(dev, irqs, buf.bus_address + 100, EDU_BUFFER, 1024, 0x1 | 0x4)
                assert await dev.bar_read(0, EDU_BUFFER, 4) == int.from_bytes(data[:4], "little")
                await edu_dma(dev, irqs, EDU_BUFFER, buf.bus_address + 5000, 1024, 0x7)
                assert buf.read(5000, 1024) == data
                assert buf.view[100:104].tobytes() == data[:4]
            assert not buf.mapped
            stats = bus.statistics()
            assert stats.dma_calls_answered == (0 if kind == "unix" else 2)
            assert stats.dma_calls_faulted == 0


@pytest.mark.parametrize("kind", ["unix", "memory"])
async def test_dma_outside_every_buffer_is_reported_on_dma_faults(
    kind: str, tmp_path: Path
) -> None:
    async with running_backend(ONE_GUEST, transports=(kind,), tmp=tmp_path) as rb:
        async with pcifront.connect(rb.address(kind), guest="guest0", token=TEST_TOKEN) as bus:
            dev = bus.devices[0]
            async with dev.interrupts(mode="msi") as irqs, await bus.dma_map(4096) as buf:
                buf.write(0, b"\xaa" * 4096)
                # Device -> RAM, 64 bytes straddling the end of the buffer: a fault.
                await edu_dma(dev, irqs, EDU_BUFFER, buf.bus_address + 4096 - 32, 64, 0x7)
                with trio.fail_after(10):
                    fault = await bus.dma_faults.receive()
                assert fault.is_write and fault.device == 0
                assert buf.read(0, 4096) == b"\xaa" * 4096  # nothing was touched
                assert bus.statistics().dma_faults == 1


async def test_buffer_arguments_are_checked(tmp_path: Path) -> None:
    async with running_backend(ONE_GUEST, transports=("memory",), tmp=tmp_path) as rb:
        async with pcifront.connect(rb.address("memory"), guest="guest0") as bus:
            with pytest.raises(pcifront.DmaError, match="size"):
                await bus.dma_map(0)
            buf = await bus.dma_map(16)
            with pytest.raises(pcifront.DmaError, match="outside"):
                buf.write(10, b"x" * 7)
            with pytest.raises(pcifront.DmaError, match="outside"):
                buf.read(-1, 2)
            await buf.unmap()
            await buf.unmap()  # idempotent
            with pytest.raises(pcifront.DmaError, match="unmapped"):
                buf.read(0, 1)


# --------------------------------------------------------------------------- fake backend

_names = itertools.count()


class FakeBackend:
    """A scripted backend: answers the handshake, snapshot and DMA map/unmap requests."""

    def __init__(self, transport: FrameTransport) -> None:
        self.transport = transport
        self.conn = Connection(
            Role.SERVER, limits=Limits(), features=("bus-snapshot", "interrupts", "dma")
        )
        self.results: list[DmaCallResult] = []
        self.result_arrived = trio.lowlevel.ParkingLot()
        self.next_address = 0x10000
        # The test body and run() both send: one at a time, as a transport requires.
        self.send_lock = trio.Lock()

    async def send(self, msg: Message) -> None:
        async with self.send_lock:
            await self.transport.send_frame(self.conn.send(msg))

    def answer(self, request: Request) -> Message:
        if isinstance(request, SnapshotRequest):
            info = DeviceInfo(0, 0x1234, 0x11E8, 0xFF00, 0x10, 0, 0x1AF4, 0x1100)
            return SnapshotReply(request.request_id, (info,))
        if isinstance(request, DmaMapRequest):
            address, self.next_address = self.next_address, self.next_address + 0x10000
            return ValueReply(request.request_id, address)
        assert isinstance(request, DmaUnmapRequest | PingRequest), request
        return DoneReply(request.request_id)

    async def run(self) -> None:
        self.conn.receive(await self.transport.receive_frame())
        await self.transport.send_frame(self.conn.accept())
        while True:
            try:
                msg = self.conn.receive(await self.transport.receive_frame())
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            if isinstance(msg, Request):
                await self.send(self.answer(msg))
            elif isinstance(msg, DmaCallResult):
                self.results.append(msg)
                self.result_arrived.unpark_all()

    async def call(self, call: DmaReadCall | DmaWriteCall) -> DmaCallResult:
        before = len(self.results)
        await self.send(call)
        with trio.fail_after(10):
            while len(self.results) == before:
                await self.result_arrived.park()
        result = self.results[-1]
        assert result.call_id == call.call_id
        return result


@asynccontextmanager
async def fake_bus() -> AsyncIterator[tuple[FakeBackend, pcifront.Bus]]:
    listener = await open_listener(f"memory:pcifront-fake-{next(_names)}")
    async with listener, trio.open_nursery() as nursery:
        fake: list[FakeBackend] = []

        async def serve() -> None:
            fake.append(FakeBackend(await listener.accept()))
            await fake[0].run()

        nursery.start_soon(serve)
        async with pcifront.connect(listener.address, guest="guest0") as bus:
            yield fake[0], bus
        nursery.cancel_scope.cancel()


async def test_dma_calls_are_bounds_checked_against_the_buffers() -> None:
    async with fake_bus() as (fake, bus):
        rw = await bus.dma_map(4096)
        ro = await bus.dma_map(100, writable=False)
        rw.write(0, bytes(range(256)) * 16)
        ro.write(0, b"r" * 100)
        base = rw.bus_address

        ok = await fake.call(DmaReadCall(1, base + 10, 16))
        assert (ok.code, ok.data) == (ErrorCode.OK, bytes(range(10, 26)))
        assert (await fake.call(DmaReadCall(2, base + 4090, 16))).code is ErrorCode.DMA_FAULT
        assert (await fake.call(DmaReadCall(3, base - 1, 1))).code is ErrorCode.DMA_FAULT
        assert (await fake.call(DmaReadCall(4, 0x5, 1))).code is ErrorCode.DMA_FAULT

        done = await fake.call(DmaWriteCall(5, base + 4000, b"\x01" * 96))
        assert (done.code, rw.read(4000, 96)) == (ErrorCode.OK, b"\x01" * 96)
        spill = await fake.call(DmaWriteCall(6, base + 4000, b"\x02" * 97))
        assert spill.code is ErrorCode.DMA_FAULT and rw.read(4000, 96) == b"\x01" * 96
        refused = await fake.call(DmaWriteCall(7, ro.bus_address, b"w"))
        assert refused.code is ErrorCode.DMA_FAULT and ro.read(0, 1) == b"r"
        # Reading a read-only buffer is what it is for.
        assert (await fake.call(DmaReadCall(8, ro.bus_address, 100))).data == b"r" * 100

        await rw.unmap()
        gone = await fake.call(DmaReadCall(9, base, 1))
        assert gone.code is ErrorCode.DMA_FAULT
        stats = bus.statistics()
        assert (stats.dma_calls_answered, stats.dma_calls_faulted) == (3, 6)
        await ro.unmap()


async def test_events_for_inactive_devices_are_counted_not_queued() -> None:
    async with fake_bus() as (fake, bus):
        await fake.send(InterruptEvent(0, 0, 5))
        await fake.send(InterruptEvent(0, 0, 2))
        fault = DmaFaultEvent(0, 0x1234000, 8, False, "outside every window")
        await fake.send(fault)
        with trio.fail_after(10):
            assert await bus.dma_faults.receive() == fault
        await bus.ping()  # everything sent before the ping's reply has been handled
        stats = bus.statistics()
        assert stats.stray_interrupts == 7 and stats.interrupt_events == 2
        assert stats.dma_faults == 1


def load_edu_driver() -> Callable[[str, str, int], Awaitable[int]]:
    spec = importlib.util.spec_from_file_location("edu_driver", ROOT / "examples/edu_driver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drive: Callable[[str, str, int, bytes], Awaitable[int]] = module.drive
    return drive


@pytest.mark.parametrize("kind", ["unix", "tcp", "shm"])
async def test_edu_driver_example(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive = load_edu_driver()
    async with running_backend(ONE_GUEST, transports=(kind,), tmp=tmp_path) as rb:
        assert await drive(rb.address(kind), "guest0", 10, TEST_TOKEN) == 3628800
    out = capsys.readouterr().out
    assert "factorial(10) = 3628800 (interrupt-driven)" in out
    delivery = "inband" if kind == "tcp" else "eventfd"
    assert f"interrupts: msi via {delivery}" in out
    kind_text = "DMA messages" if kind == "tcp" else "shared memory"
    assert f"match ({kind_text})" in out
