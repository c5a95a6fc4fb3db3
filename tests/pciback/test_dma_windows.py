"""DMA windows: the IOVA allocator, shared memfd windows, message-based windows, faults
that never touch memory, and unmap waiting for in-flight DMA. Driven directly."""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from pciback.devices import DmaFaultError
from pciback.plane.dma import (
    IOVA_BASE,
    PAGE_SIZE,
    DmaMapError,
    GuestDma,
    IovaAllocator,
)
from shared.errors import ErrorCode
from shared.protocol import DmaFaultEvent

DEVICE = 0x0000_0800  # a packed virtual address


class FakeGuest:
    """The session side of message-based DMA: answers calls from local buffers."""

    def __init__(self, chunk: int = 1 << 20) -> None:
        self.buffers: dict[int, bytearray] = {}
        self.faults: list[DmaFaultEvent] = []
        self.calls: list[tuple[str, int, int]] = []
        self.chunk = chunk
        self.gate: trio.Event | None = None  # when set, calls wait for it
        self.short_reads = False

    def chunk_size(self) -> int:
        return self.chunk

    def report_fault(self, event: DmaFaultEvent) -> None:
        self.faults.append(event)

    def _locate(self, bus_address: int, length: int) -> tuple[bytearray, int]:
        for base, buf in self.buffers.items():
            if base <= bus_address and bus_address + length <= base + len(buf):
                return buf, bus_address - base
        raise AssertionError(f"the backend called outside the guest's buffers: {bus_address:#x}")

    async def _wait(self, timeout: float) -> None:
        if self.gate is not None:
            await self.gate.wait()

    async def dma_read_call(self, bus_address: int, length: int, timeout: float) -> bytes:
        self.calls.append(("read", bus_address, length))
        await self._wait(timeout)
        buf, off = self._locate(bus_address, length)
        data = bytes(buf[off : off + length])
        return data[:-1] if self.short_reads else data

    async def dma_write_call(self, bus_address: int, data: bytes, timeout: float) -> None:
        self.calls.append(("write", bus_address, len(data)))
        await self._wait(timeout)
        buf, off = self._locate(bus_address, len(data))
        buf[off : off + len(data)] = data


def sealed_memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("dma-test", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.fixture
def guest() -> FakeGuest:
    return FakeGuest()


@pytest.fixture
def space(guest: FakeGuest) -> Iterator[GuestDma]:
    space = GuestDma("alpha", call_timeout=2.0)
    space.add_session(guest)
    yield space


def map_message(space: GuestDma, guest: FakeGuest, size: int, writable: bool = True) -> int:
    address = space.map(size, writable, guest)
    guest.buffers[address] = bytearray(size)
    return address


# -- the allocator ----------------------------------------------------------------------------


def test_iova_allocator_low_first_aligned_never_zero_with_guards() -> None:
    iova = IovaAllocator()
    a = iova.allocate(100)
    b = iova.allocate(PAGE_SIZE)
    c = iova.allocate(3 * PAGE_SIZE + 1)
    assert a == IOVA_BASE and a != 0
    assert all(x % PAGE_SIZE == 0 for x in (a, b, c))
    assert b == a + 2 * PAGE_SIZE  # one page for 100 bytes, then a guard page
    assert c == b + 2 * PAGE_SIZE
    assert c + 4 * PAGE_SIZE < 1 << 28  # edu's 28-bit DMA mask reaches them
    iova.free(b)
    assert iova.allocate(10) == b  # first fit reuses the hole
    assert iova.allocate(PAGE_SIZE * 2) > c  # too big for the hole: goes after


def test_iova_allocator_full() -> None:
    iova = IovaAllocator(limit=IOVA_BASE + 4 * PAGE_SIZE)
    iova.allocate(PAGE_SIZE)
    with pytest.raises(DmaMapError) as info:
        iova.allocate(2 * PAGE_SIZE)
    assert info.value.code is ErrorCode.BUSY


# -- shared (memfd) windows ----------------------------------------------------------------


async def test_shared_window_round_trip(space: GuestDma, guest: FakeGuest) -> None:
    fd = sealed_memfd(8192)
    view = mmap.mmap(fd, 8192)
    address = space.map(8192, True, guest, os.dup(fd))
    view[100:105] = b"hello"
    assert await space.read(DEVICE, address + 100, 5) == b"hello"
    await space.write(DEVICE, address + 8190, b"!!")
    assert view[8190:8192] == b"!!"
    assert guest.calls == []  # zero copy: no message went out
    await space.unmap(address, guest)
    assert space.windows == []
    view.close()
    os.close(fd)


@pytest.mark.parametrize(
    ("size", "seals", "code", "says"),
    [
        (4096, 0, ErrorCode.ACCESS_DENIED, "F_SEAL_SHRINK"),
        (100, fcntl.F_SEAL_SHRINK, ErrorCode.INVALID_STATE, "holds 100 bytes"),
        (
            4096,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE,
            ErrorCode.ACCESS_DENIED,
            "F_SEAL_WRITE",
        ),
    ],
)
async def test_shared_window_validation(
    space: GuestDma, guest: FakeGuest, size: int, seals: int, code: ErrorCode, says: str
) -> None:
    fd = sealed_memfd(size, seals)
    with pytest.raises(DmaMapError) as info:
        space.map(4096, True, guest, fd)
    assert info.value.code is code
    assert says in info.value.message
    with pytest.raises(OSError):
        os.fstat(fd)  # the refused fd was closed, not leaked
    assert space.windows == []


async def test_shared_window_refuses_non_memfd(space: GuestDma, guest: FakeGuest) -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(DmaMapError) as info:
        space.map(4096, True, guest, r)
    assert "memfd" in info.value.message


async def test_read_only_shared_window(space: GuestDma, guest: FakeGuest) -> None:
    fd = sealed_memfd(4096, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
    address = space.map(4096, False, guest, os.dup(fd))
    assert await space.read(DEVICE, address, 4) == bytes(4)
    with pytest.raises(DmaFaultError):
        await space.write(DEVICE, address, b"x")
    assert guest.faults[-1].is_write and "read-only" in guest.faults[-1].message
    os.close(fd)


# -- faults never touch memory -------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (-1, 1),  # just before the window
        (4096, 1),  # just after
        (4090, 10),  # crosses the end: never a partial copy
        (-4, 8),  # crosses the start
        (1 << 40, 4),  # far away
    ],
)
async def test_out_of_window_dma_faults_and_touches_nothing(
    space: GuestDma, guest: FakeGuest, offset: int, length: int
) -> None:
    fd = sealed_memfd(4096)
    view = mmap.mmap(fd, 4096)
    view[:] = b"\xaa" * 4096
    address = space.map(4096, True, guest, os.dup(fd))
    other = map_message(space, guest, 4096)
    guest.buffers[other][:] = b"\xbb" * 4096
    target = address + offset
    with pytest.raises(DmaFaultError):
        await space.write(DEVICE, target, b"\x55" * length)
    with pytest.raises(DmaFaultError):
        await space.read(DEVICE, target, length)
    assert view[:] == b"\xaa" * 4096
    assert guest.buffers[other] == b"\xbb" * 4096
    assert guest.calls == []
    write_fault, read_fault = guest.faults
    assert (write_fault.device, write_fault.bus_address, write_fault.length) == (
        DEVICE,
        target,
        length,
    )
    assert write_fault.is_write and not read_fault.is_write
    assert space.statistics().faults == 2
    view.close()
    os.close(fd)


async def test_dma_with_no_windows_faults(space: GuestDma, guest: FakeGuest) -> None:
    with pytest.raises(DmaFaultError):
        await space.read(DEVICE, 0, 4)
    assert guest.faults[0].bus_address == 0


# -- message-based windows ------------------------------------------------------------------


async def test_message_window_round_trip_chunked(space: GuestDma) -> None:
    guest = FakeGuest(chunk=1000)
    space.add_session(guest)
    address = map_message(space, guest, 5000)
    await space.write(DEVICE, address + 10, bytes(range(256)) * 10)
    assert [c[2] for c in guest.calls] == [1000, 1000, 560]
    assert guest.buffers[address][10:2570] == bytes(range(256)) * 10
    guest.calls.clear()
    assert await space.read(DEVICE, address + 10, 2560) == bytes(range(256)) * 10
    assert [c[1] - address for c in guest.calls] == [10, 1010, 2010]


async def test_message_read_length_checked_exactly(space: GuestDma, guest: FakeGuest) -> None:
    address = map_message(space, guest, 4096)
    guest.short_reads = True
    with pytest.raises(DmaFaultError) as info:
        await space.read(DEVICE, address, 16)
    assert "16-byte" in info.value.message


async def test_unmap_waits_for_in_flight_dma(
    space: GuestDma, guest: FakeGuest, nursery: trio.Nursery
) -> None:
    address = map_message(space, guest, 4096)
    guest.gate = trio.Event()
    done: list[str] = []

    async def device_dma() -> None:
        await space.write(DEVICE, address, b"late but whole")
        done.append("dma")

    async def unmap() -> None:
        await space.unmap(address, guest)
        done.append("unmap")

    nursery.start_soon(device_dma)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(unmap)
    await trio.testing.wait_all_tasks_blocked()
    assert done == []  # unmap is waiting for the DMA
    with pytest.raises(DmaFaultError):  # but no new DMA gets into the closing window
        await space.read(DEVICE, address, 1)
    guest.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert done == ["dma", "unmap"]
    assert guest.buffers[address][:14] == b"late but whole"
    assert space.windows == []


async def test_unmap_of_unknown_or_foreign_window(space: GuestDma, guest: FakeGuest) -> None:
    address = map_message(space, guest, 4096)
    with pytest.raises(DmaMapError) as info:
        await space.unmap(address + PAGE_SIZE, guest)
    assert info.value.code is ErrorCode.NOT_FOUND
    other = FakeGuest()
    with pytest.raises(DmaMapError):
        await space.unmap(address, other)  # another connection's window


async def test_teardown_unmaps_every_window_of_the_session(
    space: GuestDma, guest: FakeGuest
) -> None:
    fd = sealed_memfd(4096)
    shared = space.map(4096, True, guest, fd)
    map_message(space, guest, 4096)
    other = FakeGuest()
    kept = map_message(space, other, 4096)
    await space.teardown(guest)
    assert [w.bus_address for w in space.windows] == [kept]
    with pytest.raises(OSError):
        os.fstat(fd)  # the memfd was closed
    with pytest.raises(DmaFaultError):
        await space.read(DEVICE, shared, 4)
    assert guest.faults == []  # a torn-down session gets no more fault reports


async def test_teardown_finishes_an_interrupted_unmap(
    space: GuestDma, guest: FakeGuest, nursery: trio.Nursery
) -> None:
    address = map_message(space, guest, 4096)
    guest.gate = trio.Event()
    nursery.start_soon(space.write, DEVICE, address, b"in flight")
    await trio.testing.wait_all_tasks_blocked()
    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time()  # the connection ends while unmap waits
        await space.unmap(address, guest)
    assert space.windows == [] and space.statistics().unmaps == 0
    done: list[bool] = []

    async def teardown() -> None:
        await space.teardown(guest)
        done.append(True)

    nursery.start_soon(teardown)
    await trio.testing.wait_all_tasks_blocked()
    assert done == []  # still waiting for the DMA in flight
    guest.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert done == [True]
    assert space.statistics().unmaps == 1
    assert guest.buffers[address][:9] == b"in flight"


async def test_too_many_windows(space: GuestDma, guest: FakeGuest) -> None:
    import pciback.plane.dma as dma

    limit = dma.MAX_WINDOWS
    dma.MAX_WINDOWS = 3
    try:
        for _ in range(3):
            space.map(1, True, guest)
        with pytest.raises(DmaMapError) as info:
            space.map(1, True, guest)
        assert info.value.code is ErrorCode.BUSY
    finally:
        dma.MAX_WINDOWS = limit
