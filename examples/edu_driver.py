#!/usr/bin/env python3
"""A tiny guest "driver" for QEMU's edu device, run through pcifront.

It finds the edu device (1234:11e8) on the guest's virtual bus, checks the
identification and liveness registers, computes factorial(10) in the device
twice (polling, then interrupt-driven: status bit 0x80, wait for the
interrupt, read, acknowledge through 0x64, EOI), and round-trips 100 bytes
through the device's DMA engine (guest buffer -> edu buffer at 0x40000 ->
another offset of the guest buffer, each transfer ending with the DMA-done
interrupt). MSI is used when the device offers it, INTx otherwise.

    python examples/edu_driver.py --connect unix:./pciback.sock --guest guest0

Over ``unix:``/``shm:`` interrupts arrive on eventfds and the DMA buffer is
memory shared with the backend; over ``tcp://``/``memory:`` interrupts are
messages and the backend reaches the buffer through DMA call messages. The
driver code is the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

import pcifront

EDU_VENDOR, EDU_DEVICE = 0x1234, 0x11E8
REG_ID, REG_LIVENESS, REG_FACTORIAL, REG_STATUS = 0x00, 0x04, 0x08, 0x20
REG_IRQ_STATUS, REG_IRQ_ACK = 0x24, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
STATUS_COMPUTING, STATUS_IRQ_FACTORIAL = 0x01, 0x80
IRQ_FACTORIAL, IRQ_DMA = 0x001, 0x100
DMA_START, DMA_TO_RAM, DMA_IRQ = 0x1, 0x2, 0x4
EDU_BUFFER = 0x40000
DMA_BYTES = 100
CAP_MSI = 0x05
IRQ_TIMEOUT = 10.0


async def has_msi(dev: pcifront.Device) -> bool:
    """Walk the capability list for an MSI capability."""
    if not await dev.config_read(0x06, 2) & 0x10:
        return False
    offset, seen = await dev.config_read(0x34, 1) & 0xFC, 0
    while offset and seen < 48:
        if await dev.config_read(offset, 1) == CAP_MSI:
            return True
        offset, seen = await dev.config_read(offset + 1, 1) & 0xFC, seen + 1
    return False


async def wait_irq(edu: pcifront.Device, irqs: pcifront.Interrupts, cause: int) -> int:
    """Wait for an interrupt, check edu's status says ``cause``, acknowledge it, EOI."""
    with trio.fail_after(IRQ_TIMEOUT):
        irq = await irqs.receive()
    status = await edu.bar_read(0, REG_IRQ_STATUS, 4)
    if not status & cause:
        raise SystemExit(f"interrupt {irq} but edu's interrupt status is {status:#x}")
    await edu.bar_write(0, REG_IRQ_ACK, 4, cause)  # the device lowers its line
    await irqs.eoi(irq)  # INTx: unmask; MSI: nothing to do
    return status


async def dma(
    edu: pcifront.Device, irqs: pcifront.Interrupts, src: int, dst: int, cmd: int
) -> None:
    """One edu DMA transfer of DMA_BYTES, ending with the DMA-done interrupt."""
    await edu.bar_write(0, REG_DMA_SRC, 8, src)
    await edu.bar_write(0, REG_DMA_DST, 8, dst)
    await edu.bar_write(0, REG_DMA_COUNT, 8, DMA_BYTES)
    await edu.bar_write(0, REG_DMA_CMD, 8, cmd)
    await wait_irq(edu, irqs, IRQ_DMA)


async def drive(address: str, guest: str, n: int, token: bytes | None = None) -> int:
    async with pcifront.connect(address, guest=guest, token=token) as bus:
        edu = next(
            (d for d in bus.devices if (d.vendor_id, d.device_id) == (EDU_VENDOR, EDU_DEVICE)),
            None,
        )
        if edu is None:
            raise SystemExit(f"no edu device (1234:11e8) on guest {guest}'s bus: {bus.devices}")
        print(f"edu device at {edu.address}")

        ident = await edu.bar_read(0, REG_ID, 4)
        major, minor = ident >> 24, (ident >> 16) & 0xFF
        if ident & 0xFF != 0xED:
            raise SystemExit(f"identification register reads {ident:#010x}, not an edu device")
        print(f"identification {ident:#010x} (version {major}.{minor})")

        probe = 0x12345678
        await edu.bar_write(0, REG_LIVENESS, 4, probe)
        alive = await edu.bar_read(0, REG_LIVENESS, 4)
        if alive != (~probe & 0xFFFFFFFF):
            raise SystemExit(f"liveness check failed: wrote {probe:#x}, read {alive:#x}")
        print(f"liveness: wrote {probe:#010x}, read back {alive:#010x} (inverted)")

        await edu.bar_write(0, REG_FACTORIAL, 4, n)
        polls = 0
        while await edu.bar_read(0, REG_STATUS, 4) & STATUS_COMPUTING:
            polls += 1
            await trio.sleep(0.001)
        result = await edu.bar_read(0, REG_FACTORIAL, 4)
        print(f"factorial({n}) = {result} (status polled {polls} times while computing)")

        mode = "msi" if await has_msi(edu) else "intx"
        async with edu.interrupts(mode=mode, vectors=1) as irqs:
            print(f"interrupts: {mode} via {irqs.delivery}")
            await edu.bar_write(0, REG_STATUS, 4, STATUS_IRQ_FACTORIAL)
            await edu.bar_write(0, REG_FACTORIAL, 4, n)
            await wait_irq(edu, irqs, IRQ_FACTORIAL)
            by_irq = await edu.bar_read(0, REG_FACTORIAL, 4)
            print(f"factorial({n}) = {by_irq} (interrupt-driven)")
            if by_irq != result:
                raise SystemExit(f"interrupt-driven factorial gave {by_irq}, polling {result}")

            async with await bus.dma_map(4096) as buf:
                kind = "shared memory" if buf.shared else "DMA messages"
                pattern = bytes((i * 7 + 3) & 0xFF for i in range(DMA_BYTES))
                buf.write(0, pattern)
                back = 2048
                await dma(edu, irqs, buf.bus_address, EDU_BUFFER, DMA_START | DMA_IRQ)
                await dma(
                    edu, irqs, EDU_BUFFER, buf.bus_address + back,
                    DMA_START | DMA_TO_RAM | DMA_IRQ,
                )
                copied = buf.read(back, DMA_BYTES)
                if copied != pattern:
                    raise SystemExit("DMA round trip corrupted the data")
                print(
                    f"DMA: {DMA_BYTES} bytes guest {buf.bus_address:#x} -> edu {EDU_BUFFER:#x} "
                    f"-> guest {buf.bus_address + back:#x} match ({kind})"
                )
            stats = irqs.statistics()
            print(f"interrupts received: {stats.delivered} (fired {stats.fired} times)")
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", default="unix:./pciback.sock")
    parser.add_argument("--guest", default="guest0")
    parser.add_argument("-n", type=int, default=10)
    parser.add_argument("--token-file", help="the guest's token (tcp:// and vsock:// only)")
    args = parser.parse_args()
    token = Path(args.token_file).read_bytes() if args.token_file else None
    result = trio.run(drive, args.connect, args.guest, args.n, token)
    if args.n == 10 and result != 3628800:
        print(f"expected 3628800, got {result}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
