"""QEMU's edu device model, alone and with a test DeviceContext in a trio nursery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.testing

from pciback.devices import (
    DeviceContext,
    DmaFaultError,
    EduDevice,
    edu_factorial,
)
from shared.errors import ConfigAccessError, ErrorCode, PcisplitError
from shared.pci import CapId, Reg, Status, walk_capabilities
from tests.support.sinks import RecordingSink


class FakeContext(DeviceContext):
    """A DeviceContext over a nursery, with an optional bytearray as "guest memory".

    Guest memory is one window at bus address ``base``; anything outside it faults.
    """

    def __init__(
        self, nursery: trio.Nursery, memory: bytearray | None = None, base: int = 0
    ) -> None:
        self.nursery = nursery
        self.lock = trio.Lock()
        self.sink = RecordingSink()
        self.memory = memory
        self.base = base
        self.faults: list[int] = []

    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        async def run() -> None:
            await fn()

        self.nursery.start_soon(run, name=name)

    def locked(self) -> AbstractAsyncContextManager[None]:
        return self.lock

    @property
    def interrupts(self) -> RecordingSink:
        return self.sink

    @property
    def dma_available(self) -> bool:
        return self.memory is not None

    def _window(self, address: int, length: int) -> slice:
        assert self.memory is not None
        start = address - self.base
        if start < 0 or start + length > len(self.memory):
            self.faults.append(address)
            raise DmaFaultError(f"DMA at {address:#x}+{length} is outside the window")
        return slice(start, start + length)

    async def dma_read(self, address: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        assert self.memory is not None
        return bytes(self.memory[self._window(address, length)])

    async def dma_write(self, address: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        assert self.memory is not None
        self.memory[self._window(address, len(data))] = data


def reg(dev: EduDevice, offset: int, size: int = 4) -> int:
    return dev.bar_read(0, offset, size)


def put(dev: EduDevice, offset: int, value: int, size: int = 4) -> None:
    dev.bar_write(0, offset, size, value)


# -- config space -------------------------------------------------------------------------


def test_edu_config_space() -> None:
    dev = EduDevice()
    assert dev.config_read(Reg.VENDOR_ID, 4) == 0x11E8_1234
    assert dev.config_read(Reg.REVISION_ID, 4) == 0x00FF_0010
    assert dev.config_read(Reg.INTERRUPT_PIN, 1) == 1
    dev.config_write(Reg.BAR0, 4, 0xFFFF_FFFF)
    assert dev.config_read(Reg.BAR0, 4) == 0xFFF0_0000  # 1 MiB, 32-bit, non-prefetchable
    walk = walk_capabilities(dev.config_image())
    assert [c.id for c in walk.standard] == [CapId.MSI]
    msi = walk.standard[0].offset
    assert dev.config_read(msi + 2, 2) == 0x0080  # 1 vector, 64-bit, no masking
    assert [(b.index, b.size) for b in dev.bars()] == [(0, 1 << 20)]


# -- registers ----------------------------------------------------------------------------


def test_identification_and_liveness() -> None:
    dev = EduDevice()
    assert reg(dev, 0x04) == 0xFFFFFFFF  # QEMU: ~0 before anything was written
    assert reg(dev, 0x00) == 0x010000ED
    put(dev, 0x00, 0x12345678)  # read-only
    assert reg(dev, 0x00) == 0x010000ED
    put(dev, 0x04, 0x12345678)
    assert reg(dev, 0x04) == 0xEDCBA987
    put(dev, 0x04, 0)
    assert reg(dev, 0x04) == 0xFFFFFFFF


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, 1),
        (1, 1),
        (5, 120),
        (10, 3628800),
        (12, 479001600),
        (13, 6227020800 & 0xFFFFFFFF),
        (33, 0x80000000),
        (34, 0),
        (0xFFFFFFFF, 0),
    ],
)
def test_factorial_is_truncated_to_32_bits(n: int, expected: int) -> None:
    assert edu_factorial(n) == expected


def test_factorial_inline_without_context() -> None:
    dev = EduDevice()
    put(dev, 0x08, 10)
    assert reg(dev, 0x20) & 0x01 == 0
    assert reg(dev, 0x08) == 3628800


def test_status_register_bits() -> None:
    dev = EduDevice()
    put(dev, 0x20, 0xFFFFFFFF)
    assert reg(dev, 0x20) == 0x80  # "computing" is read-only
    put(dev, 0x20, 0)
    assert reg(dev, 0x20) == 0


def test_interrupt_raise_and_ack_hold_values() -> None:
    dev = EduDevice()
    put(dev, 0x60, 0x5)
    put(dev, 0x60, 0x100)
    assert reg(dev, 0x24) == 0x105
    assert dev.intx_asserted
    assert dev.config_read(Reg.STATUS, 2) & Status.INTERRUPT
    put(dev, 0x24, 0)  # interrupt status is read-only
    assert reg(dev, 0x24) == 0x105
    put(dev, 0x64, 0x101)
    assert reg(dev, 0x24) == 0x004
    assert dev.intx_asserted
    put(dev, 0x64, 0x4)
    assert reg(dev, 0x24) == 0
    assert not dev.intx_asserted


def test_write_only_and_unknown_registers_read_all_ones() -> None:
    dev = EduDevice()
    assert reg(dev, 0x60) == 0xFFFFFFFF
    assert reg(dev, 0x0C) == 0xFFFFFFFF
    assert reg(dev, 0xA0, 8) == 0xFFFF_FFFF_FFFF_FFFF
    put(dev, 0x0C, 1)  # ignored
    assert reg(dev, 0x0C) == 0xFFFFFFFF


@pytest.mark.parametrize(
    ("offset", "size"), [(0x00, 1), (0x04, 2), (0x08, 8), (0x80, 2), (0x80, 1)]
)
def test_mmio_size_rules(offset: int, size: int) -> None:
    dev = EduDevice()
    with pytest.raises(ConfigAccessError) as info:
        dev.bar_read(0, offset, size)
    assert info.value.code is ErrorCode.INVALID_SIZE
    with pytest.raises(ConfigAccessError):
        dev.bar_write(0, offset, size, 0)


def test_mmio_outside_bar() -> None:
    with pytest.raises(ConfigAccessError) as info:
        EduDevice().bar_read(0, 1 << 20, 4)
    assert info.value.code is ErrorCode.INVALID_OFFSET


def test_dma_registers_hold_values() -> None:
    dev = EduDevice()
    put(dev, 0x80, 0x1122334455667788, 8)
    put(dev, 0x88, 0x40000, 8)
    put(dev, 0x90, 100)
    assert reg(dev, 0x80, 8) == 0x1122334455667788
    assert reg(dev, 0x80, 4) == 0x55667788
    assert reg(dev, 0x88, 8) == 0x40000
    assert reg(dev, 0x90, 8) == 100
    put(dev, 0x80, 0xAABBCCDD)  # a 4-byte write replaces the whole register, as in QEMU
    assert reg(dev, 0x80, 8) == 0xAABBCCDD


def test_dma_buffer_through_bar() -> None:
    dev = EduDevice()
    put(dev, 0x40000, 0x0807060504030201, 8)
    put(dev, 0x40FFC, 0xDEADBEEF)
    assert reg(dev, 0x40004) == 0x08070605
    assert bytes(dev.buffer[:8]) == bytes(range(1, 9))
    assert reg(dev, 0x40FFC) == 0xDEADBEEF


def test_dma_without_context_is_not_implemented() -> None:
    dev = EduDevice()
    put(dev, 0x80, 0x1000, 8)
    put(dev, 0x88, 0x40000, 8)
    put(dev, 0x90, 16, 8)
    with pytest.raises(PcisplitError) as info:
        put(dev, 0x98, 1, 8)
    assert info.value.code is ErrorCode.NOT_IMPLEMENTED
    assert "guest memory windows" in str(info.value)
    assert reg(dev, 0x98, 8) == 0  # the command did not start


def test_reset_restores_model_state() -> None:
    dev = EduDevice()
    put(dev, 0x04, 1)
    put(dev, 0x08, 5)
    put(dev, 0x20, 0x80)
    put(dev, 0x60, 3)
    put(dev, 0x40000, 7)
    dev.reset()
    assert [reg(dev, o) for o in (0x04, 0x08, 0x20, 0x24, 0x40000)] == [0xFFFFFFFF, 0, 0, 0, 0]
    assert not dev.intx_asserted


# -- with a context -----------------------------------------------------------------------


async def test_factorial_in_background_sets_then_clears_computing(nursery: trio.Nursery) -> None:
    dev = EduDevice()
    ctx = FakeContext(nursery)
    dev.attach(ctx)
    put(dev, 0x20, 0x80)  # interrupt when done
    put(dev, 0x08, 10)
    assert reg(dev, 0x20) == 0x81
    put(dev, 0x08, 3)  # ignored while computing
    await trio.testing.wait_all_tasks_blocked()
    assert reg(dev, 0x20) == 0x80
    assert reg(dev, 0x08) == 3628800
    assert reg(dev, 0x24) == 0x01
    assert ctx.sink.events == [("assert", 0)]
    put(dev, 0x64, 0x01)
    assert ctx.sink.events == [("assert", 0), ("deassert", 0)]


async def test_factorial_result_dropped_after_reset(nursery: trio.Nursery) -> None:
    dev = EduDevice()
    dev.attach(FakeContext(nursery))
    put(dev, 0x08, 10)
    dev.reset()
    await trio.testing.wait_all_tasks_blocked()
    assert reg(dev, 0x08) == 0
    assert reg(dev, 0x20) == 0


async def test_factorial_task_waits_for_device_lock(nursery: trio.Nursery) -> None:
    dev = EduDevice()
    ctx = FakeContext(nursery)
    dev.attach(ctx)
    async with ctx.lock:
        put(dev, 0x08, 4)
        await trio.testing.wait_all_tasks_blocked()
        assert reg(dev, 0x20) & 0x01  # the task cannot commit while we hold the lock
    await trio.testing.wait_all_tasks_blocked()
    assert reg(dev, 0x08) == 24


async def test_interrupts_use_msi_when_enabled(nursery: trio.Nursery) -> None:
    dev = EduDevice()
    ctx = FakeContext(nursery)
    dev.attach(ctx)
    msi = walk_capabilities(dev.config_image()).standard[0].offset
    dev.config_write(msi + 2, 2, 1)
    put(dev, 0x60, 0x10)
    put(dev, 0x64, 0x10)
    assert ctx.sink.events == [("msi", 0)]
    assert reg(dev, 0x24) == 0


async def test_dma_unavailable_in_context_without_dma(nursery: trio.Nursery) -> None:
    dev = EduDevice()
    dev.attach(FakeContext(nursery))
    put(dev, 0x88, 0x40000, 8)
    put(dev, 0x90, 4, 8)
    with pytest.raises(PcisplitError) as info:
        put(dev, 0x98, 1, 8)
    assert info.value.code is ErrorCode.NOT_IMPLEMENTED


def program_dma(dev: EduDevice, src: int, dst: int, count: int, command: int) -> None:
    put(dev, 0x80, src, 8)
    put(dev, 0x88, dst, 8)
    put(dev, 0x90, count, 8)
    put(dev, 0x98, command, 8)


async def test_dma_round_trip(nursery: trio.Nursery) -> None:
    memory = bytearray(0x10000)
    memory[0x1000:0x1064] = bytes(range(100))
    dev = EduDevice()
    ctx = FakeContext(nursery, memory)
    dev.attach(ctx)
    program_dma(dev, 0x1000, 0x40000, 100, 0x1 | 0x4)  # RAM -> EDU, interrupt when done
    assert reg(dev, 0x98, 8) & 0x1
    put(dev, 0x90, 5, 8)  # ignored while the transfer runs
    await trio.testing.wait_all_tasks_blocked()
    assert reg(dev, 0x98, 8) & 0x1 == 0
    assert bytes(dev.buffer[:100]) == bytes(range(100))
    assert reg(dev, 0x90, 8) == 100
    assert reg(dev, 0x24) == 0x100
    put(dev, 0x64, 0x100)
    program_dma(dev, 0x40000, 0x8000, 100, 0x1 | 0x2)  # EDU -> RAM, no interrupt
    await trio.testing.wait_all_tasks_blocked()
    assert memory[0x8000:0x8064] == bytes(range(100))
    assert reg(dev, 0x24) == 0
    assert ctx.sink.events == [("assert", 0), ("deassert", 0)]


async def test_dma_address_clamped_to_28_bits_then_faults(nursery: trio.Nursery) -> None:
    memory = bytearray(0x2000)
    memory[0x100:0x104] = b"ABCD"
    dev = EduDevice()
    ctx = FakeContext(nursery, memory)
    dev.attach(ctx)
    program_dma(dev, 0x1000_0100, 0x40000, 4, 0x1)  # bit 28 set: clamped to 0x100
    await trio.testing.wait_all_tasks_blocked()
    assert bytes(dev.buffer[:4]) == b"ABCD"
    program_dma(dev, 0x0FFF_0000, 0x40000, 4, 0x1 | 0x4)  # inside the mask, outside memory
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.faults == [0x0FFF_0000]
    assert reg(dev, 0x98, 8) & 0x1 == 0  # the transfer ended
    assert bytes(dev.buffer[:4]) == b"ABCD"  # nothing copied


@pytest.mark.parametrize(("dst", "count"), [(0x3FFFF, 4), (0x40FFF, 2), (0x40000, 0), (0, 4)])
async def test_dma_device_range_checked(nursery: trio.Nursery, dst: int, count: int) -> None:
    dev = EduDevice()
    dev.attach(FakeContext(nursery, bytearray(0x1000)))
    with pytest.raises(PcisplitError) as info:
        program_dma(dev, 0, dst, count, 1)
    assert info.value.code is ErrorCode.OPERATION_FAILED
    assert reg(dev, 0x98, 8) == 0
