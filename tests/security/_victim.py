"""A real frontend process for the fault loop: ``python _victim.py ADDRESS TOKEN``.

Connects as guest1, writes a mark into edu1's liveness register and its
interrupt line, takes edu1's MSI interrupt (an eventfd on unix:/shm:) and a
64 KiB shared DMA window, prints ``ready``, then streams writes for ever:
DMA buffer contents, edu DMA transfers from the window into the device,
interrupt raises it services, and config writes. The fault loop kills it with
SIGKILL at a random point of that stream.
"""

from __future__ import annotations

import sys

import trio

import pcifront

EDU = 0x11E8
SRC, DST, COUNT, CMD, IRQ_RAISE, IRQ_ACK, STATUS = 0x80, 0x88, 0x90, 0x98, 0x60, 0x64, 0x24
EDU_BUFFER = 0x40000
LIVENESS, MARK = 0x04, 0x5EC2E7  # the fault loop checks the next owner does not read ~MARK


async def main(address: str, token: str) -> None:
    async with pcifront.connect(address, guest="guest1", token=token.encode()) as bus:
        edu = next(d for d in bus.devices if d.device_id == EDU)
        await edu.config_write(0x04, 2, 0x6)  # memory decode and bus master
        await edu.bar_write(0, LIVENESS, 4, MARK)
        await edu.config_write(0x3C, 1, 0xA5)
        async with edu.interrupts(mode="msi", vectors=1) as irqs:
            async with await bus.dma_map(65536) as buf:
                print("ready", flush=True)
                n = 0
                while True:
                    n += 1
                    buf.write((n * 64) % 65536, n.to_bytes(8, "little") * 8)
                    await edu.bar_write(0, SRC, 8, buf.bus_address + (n * 64) % 65536)
                    await edu.bar_write(0, DST, 8, EDU_BUFFER)
                    await edu.bar_write(0, COUNT, 8, 64)
                    await edu.bar_write(0, CMD, 8, 0x01)
                    await edu.bar_write(0, IRQ_RAISE, 4, 1)
                    irq = await irqs.receive()
                    await edu.bar_write(0, IRQ_ACK, 4, 1)
                    await irqs.eoi(irq)
                    await edu.config_write(0x3C, 1, n & 0xFF)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
