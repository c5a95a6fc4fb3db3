"""DMA through the whole backend: edu's DMA engine against guest windows, message-based
(any transport) and shared memfds (unix:, shm:), faults, ownership, unmap and teardown."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from pciback.testing import running_backend
from shared.errors import ErrorCode
from shared.protocol import (
    IRQ_MODE_MSI,
    BarReadRequest,
    BarWriteRequest,
    DmaCallResult,
    DmaMapRequest,
    DmaReadCall,
    DmaUnmapRequest,
    ErrorReply,
    InterruptEnableRequest,
    PingRequest,
    ValueReply,
)
from tests.support.configs import TWO_GUESTS
from tests.support.rawguest import (
    DMA_BUFFER,
    DMA_CMD,
    DMA_COUNT,
    DMA_DST,
    DMA_SRC,
    EDU,
    IRQ_ACK,
    IRQ_STATUS,
    RawGuest,
    raw_guest,
    sealed_memfd,
)

CONFIG = "[dma]\ncall_timeout = 2.0\n" + TWO_GUESTS

START, TO_RAM, IRQ = 0x1, 0x2, 0x4
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(100))


async def bar_write(g: RawGuest, offset: int, value: int, size: int = 4) -> None:
    await g.ok(lambda rid: BarWriteRequest(rid, EDU, 0, offset, size, value))


async def bar_read(g: RawGuest, offset: int, size: int = 4) -> int:
    reply = await g.ok(lambda rid: BarReadRequest(rid, EDU, 0, offset, size))
    assert isinstance(reply, ValueReply)
    return reply.value


async def dma_map(g: RawGuest, size: int, *, shared_fd: int | None = None) -> int:
    fds = [shared_fd] if shared_fd is not None else []
    reply = await g.ok(lambda rid: DmaMapRequest(rid, size, True, shared_fd is not None), fds)
    assert isinstance(reply, ValueReply)
    return reply.value


async def edu_dma(g: RawGuest, src: int, dst: int, count: int, command: int) -> None:
    """Program one edu transfer and wait for its DMA-done interrupt (0x100)."""
    seen = len(g.interrupts)
    await bar_write(g, DMA_SRC, src, 8)
    await bar_write(g, DMA_DST, dst, 8)
    await bar_write(g, DMA_COUNT, count, 8)
    await bar_write(g, DMA_CMD, command | START | IRQ, 8)
    with trio.fail_after(5):
        await g.wait_interrupts(seen + 1)
    assert await bar_read(g, IRQ_STATUS) & 0x100
    assert await bar_read(g, DMA_CMD, 8) & START == 0
    await bar_write(g, IRQ_ACK, 0x100)


async def edu_buffer(g: RawGuest, count: int) -> bytes:
    words = [await bar_read(g, DMA_BUFFER + i, 4) for i in range(0, count, 4)]
    return b"".join(w.to_bytes(4, "little") for w in words)[:count]


async def msi_on(g: RawGuest) -> None:
    await g.ok(lambda rid: InterruptEnableRequest(rid, EDU, IRQ_MODE_MSI, 1))


@pytest.mark.parametrize("kind", ["memory", "tcp"])
async def test_edu_dma_round_trip_through_messages(kind: str, tmp_path: Path) -> None:
    async with (
        running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb,
        raw_guest(rb.address(kind), "alpha") as g,
    ):
        await msi_on(g)
        address = await dma_map(g, 4096)
        assert address and address % 4096 == 0 and address < 1 << 28
        g.buffers[address] = bytearray(4096)
        g.buffers[address][:100] = PATTERN
        await edu_dma(g, address, DMA_BUFFER, 100, 0)  # RAM -> edu
        assert await edu_buffer(g, 100) == PATTERN
        await edu_dma(g, DMA_BUFFER, address + 2048, 100, TO_RAM)  # edu -> RAM
        assert bytes(g.buffers[address][2048:2148]) == PATTERN
        assert [type(c).__name__ for c in g.calls] == ["DmaReadCall", "DmaWriteCall"]
        await g.ok(lambda rid: DmaUnmapRequest(rid, address))
        assert rb.backend.dma.space("alpha").windows == []


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_edu_dma_round_trip_through_shared_memfd(kind: str, tmp_path: Path) -> None:
    async with (
        running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb,
        raw_guest(rb.address(kind), "alpha") as g,
    ):
        await msi_on(g)
        fd = sealed_memfd(8192)
        memory = mmap.mmap(fd, 8192)
        try:
            address = await dma_map(g, 8192, shared_fd=fd)
            memory[:100] = PATTERN
            await edu_dma(g, address, DMA_BUFFER, 100, 0)
            assert await edu_buffer(g, 100) == PATTERN
            await edu_dma(g, DMA_BUFFER, address + 5000, 100, TO_RAM)
            assert memory[5000:5100] == PATTERN
            assert g.calls == []  # zero copy: no DMA messages
            await g.ok(lambda rid: DmaUnmapRequest(rid, address))
        finally:
            memory.close()
            os.close(fd)


async def test_unsealed_memfd_refused(tmp_path: Path) -> None:
    async with (
        running_backend(CONFIG, transports=("unix",), tmp=tmp_path) as rb,
        raw_guest(rb.address("unix"), "alpha") as g,
    ):
        fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        try:
            reply = await g.request(lambda rid: DmaMapRequest(rid, 4096, True, True), [fd])
        finally:
            os.close(fd)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.ACCESS_DENIED
        assert "F_SEAL_SHRINK" in reply.message


async def test_out_of_window_dma_faults_and_never_touches_memory() -> None:
    async with (
        running_backend(CONFIG) as rb,
        raw_guest(rb.address("memory"), "alpha") as g,
    ):
        await msi_on(g)
        address = await dma_map(g, 4096)
        g.buffers[address] = bytearray(b"\xaa" * 4096)
        # edu -> RAM straddling the window's end: a fault, not a partial copy.
        await edu_dma(g, DMA_BUFFER, address + 4000, 100, TO_RAM)
        # RAM -> edu from an address nobody mapped.
        await edu_dma(g, 0x0F00_0000, DMA_BUFFER, 64, 0)
        faults = await g.wait_faults(2)
        assert [(f.device, f.bus_address, f.length, f.is_write) for f in faults] == [
            (EDU, address + 4000, 100, True),
            (EDU, 0x0F00_0000, 64, False),
        ]
        assert g.buffers[address] == b"\xaa" * 4096
        assert g.calls == []  # the backend never asked the guest for memory it did not map


async def test_device_reaches_only_its_own_guests_windows() -> None:
    async with (
        running_backend(CONFIG) as rb,
        raw_guest(rb.address("memory"), "alpha") as alpha,
        raw_guest(rb.address("memory"), "beta") as beta,
    ):
        await msi_on(alpha)
        beta_window = await dma_map(beta, 4096)  # beta's window: the same low IOVA...
        beta.buffers[beta_window] = bytearray(b"\xbb" * 4096)
        # ...that alpha's device now targets. alpha has mapped nothing: a fault for alpha.
        await edu_dma(alpha, DMA_BUFFER, beta_window, 100, TO_RAM)
        await edu_dma(alpha, beta_window, DMA_BUFFER, 100, 0)
        assert len(await alpha.wait_faults(2)) == 2
        assert beta.calls == [] and beta.faults == []
        assert beta.buffers[beta_window] == b"\xbb" * 4096


async def test_removed_device_loses_dma() -> None:
    async with (
        running_backend(CONFIG) as rb,
        raw_guest(rb.address("memory"), "alpha") as g,
    ):
        address = await dma_map(g, 4096)
        g.buffers[address] = bytearray(4096)
        dev = rb.backend.registry.get("edu-a")
        runtime = dev.runtime
        assert runtime is not None
        rb.backend.registry.unassign("edu-a")
        from pciback.devices import DmaFaultError

        with pytest.raises(DmaFaultError):
            await runtime.dma_write(address, b"stale")
        assert g.calls == []


async def test_unmap_waits_for_in_flight_dma() -> None:
    async with (
        running_backend(CONFIG) as rb,
        raw_guest(rb.address("memory"), "alpha") as g,
    ):
        await msi_on(g)
        address = await dma_map(g, 4096)
        g.buffers[address] = bytearray(PATTERN + bytes(4096 - 100))
        g.answer_calls = False
        await bar_write(g, DMA_SRC, address, 8)
        await bar_write(g, DMA_DST, DMA_BUFFER, 8)
        await bar_write(g, DMA_COUNT, 100, 8)
        await bar_write(g, DMA_CMD, START | IRQ, 8)
        while not g.calls:
            await g.arrived.park()
        unmapped: list[object] = []

        async def unmap() -> None:
            unmapped.append(await g.request(lambda rid: DmaUnmapRequest(rid, address)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(unmap)
            await trio.testing.wait_all_tasks_blocked()
            assert unmapped == []  # waiting for the DMA in flight
            await g.ok(PingRequest)  # the connection keeps serving meanwhile
            (call,) = g.calls
            assert isinstance(call, DmaReadCall)
            await g._send(g.conn.send(DmaCallResult(call.call_id, ErrorCode.OK, PATTERN)))
        assert isinstance(unmapped[0], type(unmapped[0])) and not isinstance(
            unmapped[0], ErrorReply
        )
        await g.wait_interrupts(1)
        assert await edu_buffer(g, 100) == PATTERN
        assert rb.backend.dma.space("alpha").windows == []


async def test_unanswered_dma_call_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        running_backend(CONFIG) as rb,
        raw_guest(rb.address("memory"), "alpha") as g,
    ):
        await msi_on(g)
        address = await dma_map(g, 4096)
        g.buffers[address] = bytearray(4096)
        g.answer_calls = False
        start = trio.current_time()
        await edu_dma(g, address, DMA_BUFFER, 100, 0)  # completes (abandoned) after 2 s
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.1)
        (call,) = g.calls
        assert isinstance(call, DmaReadCall)
        # The late answer is legal and harmless; the connection carries on.
        await g._send(g.conn.send(DmaCallResult(call.call_id, ErrorCode.OK, bytes(100))))
        await g.ok(PingRequest)
        (session,) = rb.backend.sessions
        assert session.stats.dma_call_timeouts == 1
        assert session.stats.late_call_results == 1


async def test_disconnect_tears_down_windows(tmp_path: Path) -> None:
    async with running_backend(CONFIG, transports=("unix",), tmp=tmp_path) as rb:
        fd = sealed_memfd(4096)
        try:
            async with raw_guest(rb.address("unix"), "alpha") as g:
                await dma_map(g, 4096, shared_fd=fd)
                await dma_map(g, 4096)
                assert len(rb.backend.dma.space("alpha").windows) == 2
        finally:
            os.close(fd)
        await trio.testing.wait_all_tasks_blocked()  # the backend noticed the close
        assert rb.backend.sessions == []
        assert rb.backend.dma.space("alpha").windows == []


async def test_unmap_of_an_unknown_window() -> None:
    async with (
        running_backend(CONFIG) as rb,
        raw_guest(rb.address("memory"), "alpha") as g,
    ):
        reply = await g.request(lambda rid: DmaUnmapRequest(rid, 0x10000))
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NOT_FOUND
