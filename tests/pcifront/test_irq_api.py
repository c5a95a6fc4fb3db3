"""The guest interrupt API end to end against the real backend (in process).

Over ``memory:`` interrupts travel as in-band events, over ``unix:`` on
eventfds; the tests are the same, which is the point.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import pcifront
from pciback.devices import EmulatedDevice
from pciback.plane.registry import MODELS
from pciback.testing import RunningBackend, running_backend
from shared.pci import CapId
from tests.support.configs import ONE_GUEST, device_table

EDU_RAISE, EDU_ACK, EDU_IRQ_STATUS = 0x60, 0x64, 0x24


class FrontMsixModel(EmulatedDevice):
    """A device with a 16-entry MSI-X table (PBA in BAR0), for the guest-API tests."""

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1234, device_id=0x5679, class_code=0xFF0000, interrupt_pin=1)
        self.add_bar(0, 0x10000)
        table = 16
        body = (table - 1).to_bytes(2, "little") + (0).to_bytes(4, "little")
        body += (0x8000).to_bytes(4, "little")
        mask = (0xC000).to_bytes(2, "little") + bytes(8)  # enable and function mask
        self.add_capability(CapId.MSIX, body, writable_mask=mask)


MODELS.setdefault("pcifront-test-msix", FrontMsixModel)

CONFIG = ONE_GUEST + device_table("msix0", "guest0", model="pcifront-test-msix")

KINDS = ["memory", "unix"]


@asynccontextmanager
async def bus_over(kind: str, tmp: Path) -> AsyncIterator[tuple[RunningBackend, pcifront.Bus]]:
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp) as rb:
        async with pcifront.connect(rb.address(kind), guest="guest0") as bus:
            yield rb, bus


def edu(bus: pcifront.Bus) -> pcifront.Device:
    return next(d for d in bus.devices if d.device_id == 0x11E8)


def msix_device(bus: pcifront.Bus) -> pcifront.Device:
    return next(d for d in bus.devices if d.device_id == 0x5679)


def msix_model(rb: RunningBackend) -> FrontMsixModel:
    model = rb.backend.registry.get("msix0").provider
    assert isinstance(model, FrontMsixModel)
    return model


async def settle() -> None:
    """Let the backend, the transport and the frontend's tasks run to quiescence."""
    await trio.testing.wait_all_tasks_blocked()


def nothing_pending(irqs: pcifront.Interrupts) -> bool:
    try:
        irq = irqs.receive_nowait()
    except trio.WouldBlock:
        return True
    raise AssertionError(f"unexpected interrupt {irq}")


@pytest.mark.parametrize("kind", KINDS)
async def test_intx_is_level_triggered_with_late_eoi(kind: str, tmp_path: Path) -> None:
    async with bus_over(kind, tmp_path) as (_rb, bus):
        dev = edu(bus)
        async with dev.interrupts(mode="intx") as irqs:
            assert irqs.delivery == ("eventfd" if kind == "unix" else "inband")
            await dev.bar_write(0, EDU_RAISE, 4, 0x1)
            assert await irqs.receive() == pcifront.Interrupt(0, 1)
            # Still asserted and not EOI'd: a second raise sends nothing.
            await dev.bar_write(0, EDU_RAISE, 4, 0x2)
            await settle()
            assert nothing_pending(irqs)
            # EOI while the line is still asserted: it fires again, once.
            await irqs.eoi(pcifront.Interrupt(0, 1))
            assert await irqs.receive() == pcifront.Interrupt(0, 1)
            # Acknowledge in the device (line drops), then EOI: silence.
            await dev.bar_write(0, EDU_ACK, 4, 0x3)
            await irqs.eoi(0)
            await settle()
            assert nothing_pending(irqs)
            # A new assertion after that is delivered.
            await dev.bar_write(0, EDU_RAISE, 4, 0x4)
            assert await irqs.receive() == pcifront.Interrupt(0, 1)
            await dev.bar_write(0, EDU_ACK, 4, 0x4)
            await irqs.eoi(0)
            assert irqs.statistics().eois == 3
            assert irqs.statistics().delivered == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_msi_counts_add_up_under_a_burst(kind: str, tmp_path: Path) -> None:
    async with bus_over(kind, tmp_path) as (_rb, bus):
        dev = edu(bus)
        async with dev.interrupts(mode="msi", vectors=1) as irqs:
            burst = 200
            for _ in range(burst):
                await dev.bar_write(0, EDU_RAISE, 4, 0x1)
            total = 0
            with trio.fail_after(10):
                while total < burst:
                    irq = await irqs.receive()
                    assert irq.vector == 0
                    total += irq.count
            await settle()
            assert total == burst and nothing_pending(irqs)
            stats = irqs.statistics()
            assert stats.fired == burst and stats.delivered < burst  # coalesced


@pytest.mark.parametrize("kind", KINDS)
async def test_msix_mask_pending_unmask_and_function_mask(kind: str, tmp_path: Path) -> None:
    async with bus_over(kind, tmp_path) as (rb, bus):
        dev = msix_device(bus)
        model = msix_model(rb)
        await dev.config_write(0x04, 2, 0x2)  # memory decode: MSI-X needs it
        async with dev.interrupts(mode="msix", vectors=8) as irqs:
            assert irqs.vectors == 8
            await irqs.mask(5)
            model.signal_msix(5)
            model.signal_msix(5)
            await settle()
            assert nothing_pending(irqs)
            model.signal_msix(6)  # other vectors are unaffected
            assert await irqs.receive() == pcifront.Interrupt(6, 1)
            await irqs.unmask(5)  # the pending bit is delivered once
            assert await irqs.receive() == pcifront.Interrupt(5, 1)
            await settle()
            assert nothing_pending(irqs)

            await irqs.mask_function()
            model.signal_msix(1)
            await settle()
            assert nothing_pending(irqs)
            await irqs.unmask_function()
            assert await irqs.receive() == pcifront.Interrupt(1, 1)
            with pytest.raises(pcifront.InterruptModeError, match="outside"):
                await irqs.mask(8)


@pytest.mark.parametrize("kind", KINDS)
async def test_block_disables_on_error_and_on_cancellation(kind: str, tmp_path: Path) -> None:
    async with bus_over(kind, tmp_path) as (_rb, bus):
        dev = edu(bus)
        with pytest.raises(KeyError):
            async with dev.interrupts(mode="msi"):
                raise KeyError("driver bug")
        with trio.CancelScope() as scope:
            async with dev.interrupts(mode="msi") as irqs:
                scope.cancel()
                await irqs.receive()
        assert scope.cancelled_caught
        # Both blocks disabled MSI, or enabling again would be refused (XSA-157 rules).
        async with dev.interrupts(mode="intx") as irqs:
            await dev.bar_write(0, EDU_RAISE, 4, 0x1)
            assert (await irqs.receive()).count == 1
            await dev.bar_write(0, EDU_ACK, 4, 0x1)
            await irqs.eoi(0)
        async with dev.interrupts(mode="msi") as irqs:
            await dev.bar_write(0, EDU_RAISE, 4, 0x1)
            assert (await irqs.receive()).count == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_serve_runs_the_handler_for_each_interrupt(kind: str, tmp_path: Path) -> None:
    async with bus_over(kind, tmp_path) as (_rb, bus):
        dev = edu(bus)
        seen: list[pcifront.Interrupt] = []
        async with dev.interrupts(mode="intx") as irqs:
            async with trio.open_nursery() as nursery:

                async def handler(irq: pcifront.Interrupt) -> None:
                    seen.append(irq)
                    await dev.bar_write(0, EDU_ACK, 4, 0xFF)  # drop the line before the EOI

                nursery.start_soon(irqs.serve, handler)
                for bit in (0x1, 0x2, 0x4):
                    await dev.bar_write(0, EDU_RAISE, 4, bit)
                    await settle()  # the handler ran and its EOI went back
                nursery.cancel_scope.cancel()
        assert seen == [pcifront.Interrupt(0, 1)] * 3
        assert irqs.statistics().eois == 3


async def test_bad_arguments_and_double_blocks_are_refused(tmp_path: Path) -> None:
    async with bus_over("memory", tmp_path) as (_rb, bus):
        dev = edu(bus)
        with pytest.raises(pcifront.InterruptModeError, match="unknown interrupt mode"):
            async with dev.interrupts(mode="msi-x"):
                pass
        with pytest.raises(pcifront.InterruptModeError, match="exactly one vector"):
            async with dev.interrupts(mode="intx", vectors=2):
                pass
        with pytest.raises(pcifront.InterruptModeError, match="power of two"):
            async with dev.interrupts(mode="msi", vectors=3):
                pass
        async with dev.interrupts(mode="msi") as irqs:
            with pytest.raises(pcifront.InterruptModeError, match="already has an active"):
                async with dev.interrupts(mode="msi"):
                    pass
            with pytest.raises(pcifront.InterruptModeError, match="function mask"):
                await irqs.mask_function()
        async with dev.interrupts(mode="intx") as irqs:
            with pytest.raises(pcifront.InterruptModeError, match="INTx has no vector masks"):
                await irqs.mask(0)
