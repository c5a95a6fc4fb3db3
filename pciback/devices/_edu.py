"""QEMU's ``edu`` educational device, written from its public spec.

``docs/devices.md`` lists the registers; this module follows QEMU's behaviour
where the spec leaves room:

- the factorial is computed modulo 2**32, as QEMU's ``uint32_t`` loop does
  (so n >= 34 gives 0, because 34! has 32 factors of two);
- a factorial write while "computing" is set is ignored;
- reads of unknown registers return all ones and writes to them are ignored;
- a 4-byte write to a 64-bit DMA register (0x80, 0x88, 0x90, 0x98) replaces the
  whole register with the zero-extended value; 0x84/0x8c/... are not registers;
- DMA registers ignore writes while a transfer runs, and a command write only
  counts when it sets the start bit;
- DMA bus addresses are clamped to the 28-bit DMA mask (with a warning), as
  QEMU does; the clamped address then usually faults, which is the point;
- unlike QEMU, the 4 KiB DMA buffer at 0x40000 is also readable and writable
  through BAR0 (4- or 8-byte accesses), so drivers and tests can inspect it.
"""

from __future__ import annotations

import functools
import logging

from pciback._ratelog import MODEL_LOG
from shared.errors import ConfigAccessError, ErrorCode, PcisplitError

from ._base import DmaFaultError, DmaUnavailableError
from ._emulated import EmulatedDevice

__all__ = ["EduDevice", "edu_factorial"]


EDU_VENDOR_ID = 0x1234
EDU_DEVICE_ID = 0x11E8
EDU_IDENTIFICATION = 0x010000ED
EDU_BAR_SIZE = 1 << 20

REG_ID = 0x00
REG_LIVENESS = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

STATUS_COMPUTING = 0x01
STATUS_IRQ_FACTORIAL = 0x80
IRQ_FACTORIAL = 0x001
IRQ_DMA = 0x100

DMA_START = 0x01
DMA_TO_RAM = 0x02  # direction: 0 = RAM -> EDU, 1 = EDU -> RAM
DMA_IRQ = 0x04
DMA_BUFFER_ADDR = 0x40000
DMA_BUFFER_SIZE = 4096
DMA_MASK = (1 << 28) - 1

_U32 = 0xFFFF_FFFF


def edu_factorial(n: int) -> int:
    """``n!`` modulo 2**32, as edu's 32-bit register holds it."""
    if n >= 34:
        # 34! and above contain at least 32 factors of two, so the low 32 bits are 0;
        # returning early keeps a hostile n of 4 billion from spinning the backend.
        return 0
    result = 1
    for k in range(2, n + 1):
        result = (result * k) & _U32
    return result


class EduDevice(EmulatedDevice):
    """QEMU's edu device: ID 1234:11e8, BAR0 1 MiB of registers, MSI and INTx."""

    def __init__(self) -> None:
        # QEMU gives every device its default subsystem ID, Red Hat's 1af4:1100.
        super().__init__(
            vendor_id=EDU_VENDOR_ID,
            device_id=EDU_DEVICE_ID,
            class_code=0x00FF00,
            revision=0x10,
            subsystem_vendor_id=0x1AF4,
            subsystem_id=0x1100,
            interrupt_pin=1,
        )
        self.add_bar(0, EDU_BAR_SIZE, read=self._mmio_read, write=self._mmio_write)
        self.add_msi_capability(1, address_64=True, per_vector_mask=False)
        self.reset_state()

    def reset_state(self) -> None:
        self.liveness = 0
        self.factorial = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = 0
        self.dma_dst = 0
        self.dma_count = 0
        self.dma_cmd = 0
        self.buffer = bytearray(DMA_BUFFER_SIZE)

    # -- interrupts ------------------------------------------------------------------------

    def raise_irq(self, value: int) -> None:
        """OR ``value`` into interrupt status and signal (MSI when enabled, else INTx)."""
        self.irq_status |= value & _U32
        if not self.irq_status:
            return
        if self.msi_enabled:
            self.signal_msi(0)
        else:
            self.raise_intx()

    def ack_irq(self, value: int) -> None:
        """Clear ``value``'s bits; INTx is released once no status bit remains."""
        self.irq_status &= ~value & _U32
        if not self.irq_status:
            self.lower_intx()

    # -- MMIO ------------------------------------------------------------------------------

    def _mmio_read(self, offset: int, size: int) -> int:
        self._check_size(offset, size)
        if DMA_BUFFER_ADDR <= offset < DMA_BUFFER_ADDR + DMA_BUFFER_SIZE:
            start = offset - DMA_BUFFER_ADDR
            return int.from_bytes(self.buffer[start : start + size], "little")
        mask = (1 << (8 * size)) - 1
        registers = {
            REG_ID: EDU_IDENTIFICATION,
            REG_LIVENESS: ~self.liveness & _U32,
            REG_FACTORIAL: self.factorial,
            REG_STATUS: self.status,
            REG_IRQ_STATUS: self.irq_status,
            REG_DMA_SRC: self.dma_src,
            REG_DMA_DST: self.dma_dst,
            REG_DMA_COUNT: self.dma_count,
            REG_DMA_CMD: self.dma_cmd,
        }
        return registers.get(offset, mask) & mask

    def _mmio_write(self, offset: int, size: int, value: int) -> None:
        self._check_size(offset, size)
        if DMA_BUFFER_ADDR <= offset < DMA_BUFFER_ADDR + DMA_BUFFER_SIZE:
            start = offset - DMA_BUFFER_ADDR
            self.buffer[start : start + size] = value.to_bytes(size, "little")
        elif offset == REG_LIVENESS:
            self.liveness = value & _U32  # the last value written; reads invert it
        elif offset == REG_FACTORIAL:
            self._start_factorial(value)
        elif offset == REG_STATUS:
            # Only "raise IRQ when done" is writable; "computing" belongs to the device.
            self.status = (self.status & ~STATUS_IRQ_FACTORIAL) | (value & STATUS_IRQ_FACTORIAL)
        elif offset == REG_IRQ_RAISE:
            self.raise_irq(value)
        elif offset == REG_IRQ_ACK:
            self.ack_irq(value)
        elif offset in (REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT):
            if not self.dma_cmd & DMA_START:
                setattr(self, _DMA_FIELDS[offset], value)
        elif offset == REG_DMA_CMD and value & DMA_START and not self.dma_cmd & DMA_START:
            self._start_dma(value)

    @staticmethod
    def _check_size(offset: int, size: int) -> None:
        if offset < 0x80 and size != 4:
            raise ConfigAccessError(
                f"edu: register {offset:#x} accepts only 4-byte accesses (got {size}); "
                "offsets below 0x80 are 32-bit registers",
                code=ErrorCode.INVALID_SIZE,
            )
        if offset >= 0x80 and size not in (4, 8):
            raise ConfigAccessError(
                f"edu: offset {offset:#x} accepts only 4- or 8-byte accesses (got {size})",
                code=ErrorCode.INVALID_SIZE,
            )

    # -- factorial -------------------------------------------------------------------------

    def _start_factorial(self, n: int) -> None:
        if self.status & STATUS_COMPUTING:
            return
        self.factorial = n
        ctx = self.context
        if ctx is None:
            self._finish_factorial(edu_factorial(n))
            return
        self.status |= STATUS_COMPUTING
        ctx.spawn(functools.partial(self._factorial_task, self.generation, n), name="edu-factorial")

    async def _factorial_task(self, generation: int, n: int) -> None:
        result = edu_factorial(n)
        ctx = self.context
        assert ctx is not None  # only spawned through a context
        async with ctx.locked():
            if generation == self.generation:  # a reset in between voids the result
                self._finish_factorial(result)

    def _finish_factorial(self, result: int) -> None:
        self.factorial = result
        self.status &= ~STATUS_COMPUTING
        if self.status & STATUS_IRQ_FACTORIAL:
            self.raise_irq(IRQ_FACTORIAL)

    # -- DMA -------------------------------------------------------------------------------

    def _start_dma(self, command: int) -> None:
        ctx = self.context
        if ctx is None or not ctx.dma_available:
            raise DmaUnavailableError(
                "edu DMA needs a device context with guest memory windows (a running "
                "backend); this one has none, so the transfer was not started and the DMA "
                "registers keep their values"
            )
        to_ram = bool(command & DMA_TO_RAM)
        device_addr = self.dma_src if to_ram else self.dma_dst
        count = self.dma_count
        buffer_end = DMA_BUFFER_ADDR + DMA_BUFFER_SIZE
        if not (device_addr >= DMA_BUFFER_ADDR and device_addr + count <= buffer_end and count):
            raise PcisplitError(
                f"edu DMA: device range {device_addr:#x}+{count:#x} must lie inside the "
                f"{DMA_BUFFER_SIZE}-byte buffer at {DMA_BUFFER_ADDR:#x}; transfer not started",
                code=ErrorCode.OPERATION_FAILED,
            )
        bus_addr = _clamp(self.dma_dst if to_ram else self.dma_src)
        self.dma_cmd = command & (DMA_START | DMA_TO_RAM | DMA_IRQ)
        start = device_addr - DMA_BUFFER_ADDR
        ctx.spawn(
            functools.partial(self._dma_task, self.generation, to_ram, bus_addr, start, count),
            name="edu-dma",
        )

    async def _dma_task(
        self, generation: int, to_ram: bool, bus_addr: int, start: int, count: int
    ) -> None:
        ctx = self.context
        assert ctx is not None  # only spawned through a context
        data = b""
        try:
            if to_ram:
                async with ctx.locked():
                    data = bytes(self.buffer[start : start + count])
                await ctx.dma_write(bus_addr, data)
            else:
                data = await ctx.dma_read(bus_addr, count)
                if len(data) != count:
                    raise PcisplitError(
                        f"DeviceContext.dma_read returned {len(data)} bytes, not the {count} asked",
                        code=ErrorCode.OPERATION_FAILED,
                    )
        except DmaFaultError as exc:
            # The context already reported the fault to the guest. Like QEMU, which
            # ignores a failed pci_dma_*, the transfer ends normally with nothing copied.
            # A guest can aim DMA at nothing in a loop: rate-limited and counted.
            MODEL_LOG.log(
                "edu", "DMA faults", logging.WARNING,
                "edu DMA fault, transfer abandoned: %s", exc,
            )
            data = b""
            to_ram = True  # nothing to copy into the buffer
        async with ctx.locked():
            if generation != self.generation:
                return
            if not to_ram:
                self.buffer[start : start + count] = data
            self.dma_cmd &= ~DMA_START
            if self.dma_cmd & DMA_IRQ:
                self.raise_irq(IRQ_DMA)


_DMA_FIELDS = {REG_DMA_SRC: "dma_src", REG_DMA_DST: "dma_dst", REG_DMA_COUNT: "dma_count"}


def _clamp(address: int) -> int:
    clamped = address & DMA_MASK
    if clamped != address:
        MODEL_LOG.log(
            "edu", "clamped DMA addresses", logging.WARNING,
            "edu: clamping DMA address %#x to %#x (28-bit DMA mask)", address, clamped,
        )
    return clamped
