"""The vfio-user front door's interrupts and DMA, end to end with edu and the raw client.

MSI through a trigger eventfd the client passed with DEVICE_SET_IRQS; DMA
between edu and a memfd the client mapped with DMA_MAP (at its own IOVA,
from an offset), and through DMA_READ/DMA_WRITE messages for a region
mapped without a descriptor.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import struct
from pathlib import Path

import pytest
import trio

from pciback.devices import VfioUserClient, VfioUserErrnoError
from pciback.devices._edu import (
    DMA_BUFFER_ADDR,
    DMA_IRQ,
    DMA_START,
    DMA_TO_RAM,
    IRQ_DMA,
    REG_DMA_CMD,
    REG_DMA_COUNT,
    REG_DMA_DST,
    REG_DMA_SRC,
    REG_IRQ_ACK,
    REG_IRQ_RAISE,
    REG_IRQ_STATUS,
)
from pciback.testing import running_backend
from shared.protocol import vfio_user as vu

CONFIG_TEXT = """
[[guest]]
name = "vm1"
[[device]]
id = "edu0"
model = "edu"
guest = "vm1"
policy = "permissive"
vfio_user = "{sock}"
"""
TRIGGER_FDS = vu.IRQ_DATA_EVENTFD | vu.IRQ_ACTION_TRIGGER
IOVA = 0x200000


def _w32(client: VfioUserClient, offset: int, value: int) -> None:
    client.region_write(0, offset, struct.pack("<I", value))


def _r32(client: VfioUserClient, offset: int) -> int:
    return int.from_bytes(client.region_read(0, offset, 4), "little")


def _wait_interrupt(client: VfioUserClient, efd: int) -> int:
    """Wait for the eventfd, serving the backend's DMA messages meanwhile (bounded)."""
    for _ in range(2000):
        # A DMA command may already sit in the client's buffer (it came with a reply).
        client.service_nowait()
        ready, _, _ = select.select([efd, client.fileno()], [], [], 10.0)
        if efd in ready:
            return int.from_bytes(os.read(efd, 8), "little")
    raise AssertionError("no interrupt arrived")


def _memfd(size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd, mmap.mmap(fd, size)


def _dma(client: VfioUserClient, efd: int, src: int, dst: int, count: int, cmd: int) -> None:
    _w32(client, REG_DMA_SRC, src)
    _w32(client, REG_DMA_DST, dst)
    _w32(client, REG_DMA_COUNT, count)
    _w32(client, REG_DMA_CMD, cmd | DMA_START | DMA_IRQ)
    assert _wait_interrupt(client, efd) >= 1
    assert _r32(client, REG_IRQ_STATUS) & IRQ_DMA
    _w32(client, REG_IRQ_ACK, IRQ_DMA)


async def test_msi_and_dma_through_a_mapped_memfd(tmp_path: Path) -> None:
    sock = tmp_path / "edu0.sock"
    async with running_backend(CONFIG_TEXT.format(sock=sock), tmp=tmp_path) as running:
        door = running.backend.vfio_doors["edu0"]

        def drive() -> None:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fd, ram = _memfd(2 * mmap.PAGESIZE)
            try:
                with VfioUserClient.connect(sock) as client:
                    assert client.irq_info(vu.PCI_INTX_IRQ).count == 1
                    assert client.irq_info(vu.PCI_MSI_IRQ).count == 1
                    assert client.irq_info(vu.PCI_MSIX_IRQ).count == 0
                    assert client.irq_info(vu.PCI_ERR_IRQ).count == 1
                    client.set_irqs(vu.SetIrqs(vu.PCI_MSI_IRQ, TRIGGER_FDS, 0, 1), [efd])
                    _w32(client, REG_IRQ_RAISE, 1)
                    assert _wait_interrupt(client, efd) == 1
                    _w32(client, REG_IRQ_ACK, 1)
                    # The client's RAM: the second page of the memfd, at its own IOVA.
                    client.call(vu.DmaMap(IOVA, mmap.PAGESIZE, offset=mmap.PAGESIZE), fds=[fd])
                    ram[mmap.PAGESIZE:mmap.PAGESIZE + 64] = bytes(range(64))
                    _dma(client, efd, IOVA, DMA_BUFFER_ADDR, 64, 0)
                    assert client.region_read(0, DMA_BUFFER_ADDR, 64) == bytes(range(64))
                    _dma(client, efd, DMA_BUFFER_ADDR, IOVA + 128, 64, DMA_TO_RAM)
                    assert ram[mmap.PAGESIZE + 128:mmap.PAGESIZE + 192] == bytes(range(64))
                    # An overlapping map is refused; unmapping a map that is not there too.
                    with pytest.raises(VfioUserErrnoError) as exc:
                        client.call(vu.DmaMap(IOVA, mmap.PAGESIZE))
                    assert exc.value.errno == errno.EINVAL
                    with pytest.raises(VfioUserErrnoError):
                        client.call(vu.DmaUnmap(IOVA + 0x10000, mmap.PAGESIZE))
                    client.call(vu.DmaUnmap(IOVA, mmap.PAGESIZE))
                    # DMA to memory no longer mapped: a fault; the transfer ends, nothing copied.
                    _dma(client, efd, DMA_BUFFER_ADDR, IOVA, 64, DMA_TO_RAM)
                    client.set_irqs(vu.SetIrqs(vu.PCI_MSI_IRQ, vu.IRQ_DATA_NONE
                                               | vu.IRQ_ACTION_TRIGGER, 0, 0))
            finally:
                ram.close()
                os.close(fd)
                os.close(efd)

        await trio.to_thread.run_sync(drive)
        assert door.stats.disconnects == 0
        space = running.backend.dma.space("vm1")
        assert space.windows == [] and space.stats.faults == 1


async def test_dma_through_messages_and_unmap_all(tmp_path: Path) -> None:
    sock = tmp_path / "edu0.sock"
    memory = bytearray(mmap.PAGESIZE)

    def serve_dma(body: vu.Body) -> bytes | None:
        if isinstance(body, vu.DmaAccess):
            return bytes(memory[body.address - IOVA:body.address - IOVA + body.count])
        assert isinstance(body, vu.DmaData)
        memory[body.address - IOVA:body.address - IOVA + body.count] = body.data
        return None

    async with running_backend(CONFIG_TEXT.format(sock=sock), tmp=tmp_path) as running:

        def drive() -> None:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                with VfioUserClient.connect(sock) as client:
                    client.dma_handler = serve_dma
                    client.set_irqs(vu.SetIrqs(vu.PCI_MSI_IRQ, TRIGGER_FDS, 0, 1), [efd])
                    client.call(vu.DmaMap(IOVA, mmap.PAGESIZE))  # no descriptor: messages
                    memory[:32] = b"from the client's own memory!..."
                    _dma(client, efd, IOVA, DMA_BUFFER_ADDR, 32, 0)
                    assert client.region_read(0, DMA_BUFFER_ADDR, 32) == bytes(memory[:32])
                    _dma(client, efd, DMA_BUFFER_ADDR, IOVA + 64, 32, DMA_TO_RAM)
                    assert memory[64:96] == memory[:32]
                    client.call(vu.DmaMap(IOVA + 0x10000, mmap.PAGESIZE))
                    client.call(vu.DmaUnmap(0, 0, vu.DMA_UNMAP_ALL))
            finally:
                os.close(efd)

        await trio.to_thread.run_sync(drive)
        assert running.backend.dma.space("vm1").windows == []
        assert running.backend.vfio_doors["edu0"].stats.disconnects == 0


async def test_eventfds_the_client_breaks_never_block_the_backend(tmp_path: Path) -> None:
    """A full eventfd counter coalesces; a non-eventfd is refused; closing it is harmless."""
    sock = tmp_path / "edu0.sock"
    async with running_backend(CONFIG_TEXT.format(sock=sock), tmp=tmp_path) as running:
        door = running.backend.vfio_doors["edu0"]

        def drive() -> None:
            efd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as a hostile client may leave it
            os.eventfd_write(efd, 0xFFFFFFFFFFFFFFFE)  # the counter is full
            r, w = os.pipe()
            try:
                with VfioUserClient.connect(sock) as client:
                    with pytest.raises(VfioUserErrnoError) as exc:
                        client.set_irqs(vu.SetIrqs(vu.PCI_MSI_IRQ, TRIGGER_FDS, 0, 1), [r])
                    assert exc.value.errno == errno.EINVAL
                    client.set_irqs(vu.SetIrqs(vu.PCI_MSI_IRQ, TRIGGER_FDS, 0, 1), [efd])
                    for _ in range(3):
                        _w32(client, REG_IRQ_RAISE, 1)
                        _w32(client, REG_IRQ_ACK, 1)
                    assert _r32(client, REG_IRQ_STATUS) == 0  # still answering
            finally:
                for fd in (efd, r, w):
                    os.close(fd)

        await trio.to_thread.run_sync(drive)
        assert door.stats.disconnects == 0 and door.stats.errors == 1
