"""The benchmark device, served by a real ``pciback serve`` child process.

``python -m benchmarks._irq_model serve --config FILE`` registers the model
``bench-irq`` and runs the ordinary backend CLI. The device itself raises the
interrupts and takes the timestamps, so the round trip measured is exactly
"device raises -> guest handler runs -> the handler's acknowledgement (and
for INTx the EOI) comes back -> the device sees it". ``time.perf_counter_ns``
is CLOCK_MONOTONIC, but only the device's own clock is used for latencies.

BAR0 registers (8 bytes each):

- 0x00 W: start a latency run of N round trips (the device raises, waits for
  the ack at 0x08, records the time, and raises again);
- 0x08 W: the guest handler's acknowledgement (lowers INTx);
- 0x10 W: raise a burst of N interrupts as fast as the device can;
- 0x18 R: how many round trips are recorded; 0x20 + 8*i R: sample i in ns;
- 0x40 W: DMA bus address; 0x48 W: DMA length; 0x50 W: iterations;
  0x58 W: run the DMA (1 = read guest memory, 2 = write it); the device copies
  ``length`` bytes ``iterations`` times and raises an interrupt when done;
- 0x60 R: the last DMA run's elapsed time in ns (device side).
"""

from __future__ import annotations

import sys
import time

import trio

from pciback.devices import EmulatedDevice
from pciback.plane.registry import register_model

MAX_SAMPLES = 20000
_REG_SAMPLES = 0x20


class BenchIrqDevice(EmulatedDevice):
    """Raises interrupts on demand and measures how long the guest takes to answer."""

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1234, device_id=0xBE7C, class_code=0xFF0000, interrupt_pin=1)
        self.add_bar(0, 1 << 20, read=self._read, write=self._write)
        self.add_msi_capability(1, address_64=True, per_vector_mask=False)
        self.samples: list[int] = []
        self._acked = trio.Event()
        self._raised_at = 0
        self._dma = [0, 0, 0]
        self._dma_elapsed = 0

    def _raise(self) -> None:
        if self.msi_enabled:
            self.signal_msi(0)
        else:
            self.raise_intx()

    def _read(self, offset: int, size: int) -> int:
        if offset == 0x18:
            return len(self.samples)
        if offset == 0x60:
            return self._dma_elapsed
        index = (offset - _REG_SAMPLES) // 8
        if offset >= _REG_SAMPLES and index < len(self.samples):
            return self.samples[index]
        return 0

    def _write(self, offset: int, size: int, value: int) -> None:
        ctx = self.context
        assert ctx is not None, "the benchmark device runs inside a backend"
        if offset == 0x00:
            self.samples = []
            ctx.spawn(lambda: self._latency_run(min(value, MAX_SAMPLES)), name="bench-latency")
        elif offset == 0x08:
            if self._raised_at:
                # The device sees the acknowledgement: one round trip complete.
                self.samples.append(time.perf_counter_ns() - self._raised_at)
                self._raised_at = 0
            self.lower_intx()
            self._acked.set()
        elif offset == 0x10:
            ctx.spawn(lambda: self._burst(value), name="bench-burst")
        elif 0x40 <= offset <= 0x50:
            self._dma[(offset - 0x40) // 8] = value
        elif offset == 0x58:
            address, length, iterations = self._dma
            ctx.spawn(lambda: self._dma_run(value, address, length, iterations), name="bench-dma")

    async def _latency_run(self, count: int) -> None:
        ctx = self.context
        assert ctx is not None
        for _ in range(count):
            self._acked = trio.Event()
            async with ctx.locked():
                self._raised_at = time.perf_counter_ns()
                self._raise()
            await self._acked.wait()

    async def _burst(self, count: int) -> None:
        ctx = self.context
        assert ctx is not None
        async with ctx.locked():
            for _ in range(count):
                self._raise()

    async def _dma_run(self, command: int, address: int, length: int, iterations: int) -> None:
        ctx = self.context
        assert ctx is not None
        data = bytes(length)
        start = time.perf_counter_ns()
        for _ in range(iterations):
            if command == 1:
                await ctx.dma_read(address, length)
            else:
                await ctx.dma_write(address, data)
        self._dma_elapsed = time.perf_counter_ns() - start
        async with ctx.locked():
            self._raise()


def main(argv: list[str]) -> int:
    """Register the model, then run the ordinary ``pciback`` CLI."""
    register_model("bench-irq", BenchIrqDevice)
    from pciback.cli import main as pciback_main

    return pciback_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
