"""The edu device's interrupts and DMA end to end: backend, transports and pcifront's API.

On ``unix:`` and ``shm:`` interrupts arrive on eventfds and DMA uses a shared
memfd; on ``memory:`` and ``tcp:`` both travel as messages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import pcifront
from pciback.testing import TEST_TOKEN, running_backend
from tests.support.configs import ONE_GUEST

KINDS = ["memory", "unix", "shm", "tcp"]
FD_KINDS = ("unix", "shm")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["intx", "msi"])
async def test_interrupt_driven_factorial(kind: str, mode: str, tmp_path: Path) -> None:
    async with (
        running_backend(ONE_GUEST, transports=(kind,), tmp=tmp_path) as rb,
        pcifront.connect(rb.address(kind), guest="guest0", token=TEST_TOKEN) as bus,
    ):
        (edu,) = bus.devices
        async with edu.interrupts(mode=mode, vectors=1) as irqs:
            for n, expected in ((5, 120), (10, 3628800), (12, 479001600)):
                await edu.bar_write(0, 0x20, 4, 0x80)  # interrupt when done
                await edu.bar_write(0, 0x08, 4, n)
                with trio.fail_after(5):
                    irq = await irqs.receive()
                assert irq.vector == 0
                assert await edu.bar_read(0, 0x24, 4) == 0x01
                assert await edu.bar_read(0, 0x08, 4) == expected
                await edu.bar_write(0, 0x64, 4, 0x01)  # ack: the line drops
                await irqs.eoi(irq)
            (session,) = rb.backend.sessions
            # unix: and shm: pass the eventfd; elsewhere interrupts are in-band events.
            assert session.stats.fds_received == (1 if kind in FD_KINDS else 0)
            assert (session.stats.events_sent > 0) == (kind not in FD_KINDS)
        backend = rb.backend
        dev = backend.registry.get("edu0")
        assert backend.irq.device(dev).mode is None  # disabled on exit


@pytest.mark.parametrize("kind", KINDS)
async def test_dma_round_trip(kind: str, tmp_path: Path) -> None:
    async with (
        running_backend(ONE_GUEST, transports=(kind,), tmp=tmp_path) as rb,
        pcifront.connect(rb.address(kind), guest="guest0", token=TEST_TOKEN) as bus,
    ):
        (edu,) = bus.devices
        payload = bytes(range(100))
        async with edu.interrupts(mode="msi") as irqs, await bus.dma_map(4096) as buf:
            buf.write(0, payload)
            for src, dst, count, command in (
                (buf.bus_address, 0x40000, 100, 0x1 | 0x4),  # RAM -> edu, interrupt
                (0x40000, buf.bus_address + 1024, 100, 0x1 | 0x2 | 0x4),  # edu -> RAM
            ):
                await edu.bar_write(0, 0x80, 8, src)
                await edu.bar_write(0, 0x88, 8, dst)
                await edu.bar_write(0, 0x90, 8, count)
                await edu.bar_write(0, 0x98, 8, command)
                with trio.fail_after(5):
                    await irqs.receive()
                assert await edu.bar_read(0, 0x24, 4) & 0x100
                await edu.bar_write(0, 0x64, 4, 0x100)
            assert buf.read(1024, 100) == payload
            # Shared memory is zero copy; elsewhere the frontend answered DMA calls.
            answered = bus.statistics().dma_calls_answered
            assert (answered == 0) == (kind in FD_KINDS)
        session_windows = rb.backend.dma.space("guest0").windows
        assert session_windows == []  # unmapped on exit
