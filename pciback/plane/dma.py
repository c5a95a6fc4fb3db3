"""DMA windows: the guest memory a device may reach, and nothing else (an IOMMU in software).

A guest maps windows with ``DmaMapRequest``; the backend picks each window's
bus address from the guest's IOVA space (:class:`IovaAllocator`: page aligned,
never 0, low addresses first so that a device with a narrow DMA mask - edu's
is 28 bits - can reach them). A device model then calls
``ctx.dma_read(bus_address, n)`` / ``ctx.dma_write(bus_address, data)``:

- the range must lie inside ONE window of the guest that owns the device;
  anything else is a DMA fault: the guest gets a ``DmaFaultEvent`` naming the
  address, length and device, the model gets :class:`DmaFaultError`, and no
  byte of any window is touched (a range crossing a window end is a fault,
  never a partial copy);
- a *shared* window is the guest's memfd, validated (large enough, sealed
  against shrinking, so the guest cannot make the backend SIGBUS), mapped, and
  copied in and out directly; data read from it is copied out once and only
  the copy is used (XSA-155);
- any other window is reached through ``DmaReadCall``/``DmaWriteCall``
  messages answered by the frontend, chunked, with a time-out, and the answer's
  length checked exactly.

Unmapping (and a guest disconnecting) waits for in-flight DMA on the window to
finish before the memory goes away.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import mmap
import os
import stat
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from pciback.devices import DmaFaultError
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import MAX_DMA_CHUNK, DmaFaultEvent

if TYPE_CHECKING:
    from pciback.plane.registry import ServedDevice

__all__ = [
    "PAGE_SIZE",
    "IOVA_BASE",
    "DmaMapError",
    "DmaTimeoutError",
    "IovaAllocator",
    "DmaCaller",
    "DmaWindow",
    "GuestDma",
    "DmaStatistics",
    "DmaHub",
    "DeviceDma",
]

log = logging.getLogger("pcisplit.backend.dma")

PAGE_SIZE = 4096
#: First bus address handed out. Low, so a 28-bit DMA mask (edu) reaches the windows.
IOVA_BASE = 0x10000
IOVA_LIMIT = 1 << 64
#: Windows per guest when no limit is given (``limits.max_dma_windows_per_guest``).
MAX_WINDOWS = 4096


class DmaMapError(PcisplitError):
    """A map or unmap request the backend refuses (the message says why and what to do)."""

    code = ErrorCode.INVALID_STATE


class DmaTimeoutError(DmaFaultError):
    """The frontend did not answer a DMA call in time; the transfer is abandoned."""

    code = ErrorCode.TIMED_OUT


def _page_round(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class IovaAllocator:
    """First-fit allocator of page-aligned bus-address ranges, lowest first.

    Each allocation is followed by an unallocated guard page, so two windows
    are never adjacent: a device overrunning one hits a hole, not its neighbour.
    """

    def __init__(self, base: int = IOVA_BASE, limit: int = IOVA_LIMIT) -> None:
        if base <= 0 or base % PAGE_SIZE:
            raise ValueError("the IOVA base must be a positive multiple of the page size")
        self.base = base
        self.limit = limit
        self._starts: list[int] = []
        self._ends: dict[int, int] = {}  # start -> end of the reservation (with guard)

    def allocate(self, size: int) -> int:
        """A free bus address for ``size`` bytes; raises :class:`DmaMapError` when full."""
        need = _page_round(size) + PAGE_SIZE
        candidate = self.base
        for start in self._starts:
            if candidate + need <= start:
                break
            candidate = max(candidate, self._ends[start])
        if candidate + need > self.limit:
            raise DmaMapError(
                f"no room for a {size}-byte DMA window in the guest's bus-address space; "
                "unmap windows you no longer use",
                code=ErrorCode.BUSY,
            )
        bisect.insort(self._starts, candidate)
        self._ends[candidate] = candidate + need
        return candidate

    def reserve(self, address: int, size: int) -> None:
        """Reserve exactly ``[address, address + size)``, where the guest chose it (vfio-user's
        ``DMA_MAP``): page aligned, inside the space, overlapping no window (nor its guard)."""
        end = address + size
        i = bisect.bisect_right(self._starts, address)
        if address % PAGE_SIZE or size % PAGE_SIZE or address < PAGE_SIZE or end > self.limit:
            raise DmaMapError(
                f"a DMA window at {address:#x}..{end:#x} must be page aligned ({PAGE_SIZE}) "
                f"and inside {PAGE_SIZE:#x}..{self.limit:#x}", code=ErrorCode.INVALID_OFFSET,
            )
        if (i and self._ends[self._starts[i - 1]] > address) or (
            i < len(self._starts) and self._starts[i] < end
        ):
            raise DmaMapError(
                f"a DMA window at {address:#x}..{end:#x} overlaps one already mapped; unmap it "
                "first", code=ErrorCode.BUSY,
            )
        bisect.insort(self._starts, address)
        self._ends[address] = end

    def free(self, address: int) -> None:
        self._starts.remove(address)
        del self._ends[address]


class DmaCaller(Protocol):
    """The session side of message-based DMA and fault reports (see ``pciback.guests.session``)."""

    async def dma_read_call(self, bus_address: int, length: int, timeout: float) -> bytes:
        """Ask the frontend for ``length`` bytes at ``bus_address`` (one chunk)."""

    async def dma_write_call(self, bus_address: int, data: bytes, timeout: float) -> None:
        """Ask the frontend to store ``data`` at ``bus_address`` (one chunk)."""

    def report_fault(self, event: DmaFaultEvent) -> None:
        """Queue a fault event for the guest; never blocks."""

    def chunk_size(self) -> int:
        """The largest DMA data chunk one message may carry on this connection."""


class DmaWindow:
    """One mapped window: ``[bus_address, bus_address + size)`` of one session's memory."""

    def __init__(
        self,
        bus_address: int,
        size: int,
        writable: bool,
        owner: DmaCaller,
        *,
        memory: mmap.mmap | None = None,
        fd: int = -1,
    ) -> None:
        self.bus_address = bus_address
        self.size = size
        self.writable = writable
        self.owner = owner
        self.memory = memory
        self._fd = fd
        self.in_flight = 0
        self.closing = False
        self._idle = trio.Event()
        self._idle.set()

    @property
    def shared(self) -> bool:
        return self.memory is not None

    @property
    def holds_fd(self) -> bool:
        """True while the window keeps the guest's memfd open (until :meth:`release`)."""
        return self._fd >= 0

    @property
    def end(self) -> int:
        return self.bus_address + self.size

    def enter(self) -> None:
        if self.in_flight == 0:
            self._idle = trio.Event()
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no DMA is in flight on this window."""
        await self._idle.wait()

    def release(self) -> None:
        """Unmap the memory and close the fd (only once idle)."""
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@dataclass
class DmaStatistics:
    maps: int = 0
    unmaps: int = 0
    refused_maps: int = 0
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    faults: int = 0
    calls: int = 0
    limit_refusals: int = 0  # maps refused by limits.max_dma_windows/bytes_per_guest


def _validate_memfd(fd: int, size: int, writable: bool, offset: int = 0) -> mmap.mmap:
    """Map a guest's memfd after checking it cannot shrink under us (else SIGBUS)."""
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise DmaMapError(f"the shared DMA buffer's fd is unusable: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise DmaMapError(
            "the shared DMA buffer must be a memfd (memfd_create), not a pipe, socket or device"
        )
    if info.st_size < offset + size:
        raise DmaMapError(
            f"the shared DMA buffer holds {info.st_size} bytes but the window asks for {size} "
            f"from offset {offset}; ftruncate the memfd to at least that before mapping"
        )
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise DmaMapError(
            "the shared DMA buffer does not support seals; create it with "
            "memfd_create(..., MFD_ALLOW_SEALING)",
            code=ErrorCode.ACCESS_DENIED,
        ) from exc
    if not seals & fcntl.F_SEAL_SHRINK:
        raise DmaMapError(
            "the shared DMA buffer is not sealed against shrinking; add F_SEAL_SHRINK "
            "(fcntl F_ADD_SEALS) so it cannot be truncated while the device uses it",
            code=ErrorCode.ACCESS_DENIED,
        )
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
    except OSError as exc:
        raise DmaMapError(
            f"cannot map the shared DMA buffer ({exc.strerror}); a writable window needs a "
            "memfd without F_SEAL_WRITE",
            code=ErrorCode.ACCESS_DENIED,
        ) from exc


class GuestDma:
    """One guest's DMA windows and IOVA space (shared by the guest's sessions)."""

    def __init__(
        self,
        guest: str,
        *,
        call_timeout: float = 5.0,
        max_windows: int | None = None,
        max_bytes: int | None = None,
        limit_events: Counter[str] | None = None,
    ) -> None:
        self.guest = guest
        #: Where refusals by a limit are counted by limit key (the backend's statistics).
        self.limit_events: Counter[str] = Counter() if limit_events is None else limit_events
        self.call_timeout = call_timeout
        #: ``limits.max_dma_windows_per_guest`` and ``limits.max_dma_bytes_per_guest``
        #: (windows being torn down count until their in-flight DMA has finished).
        self.max_windows = max_windows
        self.max_bytes = max_bytes
        self._iova = IovaAllocator()
        self._starts: list[int] = []
        self._windows: dict[int, DmaWindow] = {}
        #: Unmapped but not yet released (waiting for in-flight DMA).
        self._closing: set[DmaWindow] = set()
        self._reporters: list[DmaCaller] = []
        self.stats = DmaStatistics()

    def statistics(self) -> DmaStatistics:
        return self.stats

    @property
    def windows(self) -> list[DmaWindow]:
        return [self._windows[s] for s in self._starts]

    @property
    def mapped_bytes(self) -> int:
        """Bytes of this guest's windows, mapped or still being torn down."""
        return sum(w.size for w in self._windows.values()) + sum(w.size for w in self._closing)

    def held_fds(self, owner: DmaCaller) -> int:
        """Guest memfds ``owner``'s windows keep open (mapped or still being torn down)."""
        windows = [*self._windows.values(), *self._closing]
        return sum(1 for w in windows if w.owner is owner and w.holds_fd)

    def add_session(self, session: DmaCaller) -> None:
        """Fault events for this guest go to ``session`` (until :meth:`teardown`)."""
        self._reporters.append(session)

    # -- mapping ------------------------------------------------------------------------

    def map(
        self,
        size: int,
        writable: bool,
        owner: DmaCaller,
        fd: int | None = None,
        *,
        bus_address: int | None = None,
        offset: int = 0,
    ) -> int:
        """Map a window and return its bus address. With ``fd`` it is a shared memfd
        (from ``offset``, page aligned). ``bus_address``: the guest chose where
        (vfio-user's ``DMA_MAP``); otherwise the backend picks it.

        On failure ``fd`` is closed (it was the guest's; keeping it would leak).
        """
        try:
            max_windows = MAX_WINDOWS if self.max_windows is None else self.max_windows
            if len(self._windows) + len(self._closing) >= max_windows:
                self.stats.limit_refusals += 1
                self.limit_events["max_dma_windows_per_guest"] += 1
                raise DmaMapError(
                    f"guest {self.guest!r} already has {max_windows} DMA windows, the most "
                    "allowed (limits.max_dma_windows_per_guest); unmap some",
                    code=ErrorCode.BUSY,
                )
            held = self.mapped_bytes
            if self.max_bytes is not None and held + size > self.max_bytes:
                self.stats.limit_refusals += 1
                self.limit_events["max_dma_bytes_per_guest"] += 1
                raise DmaMapError(
                    f"guest {self.guest!r} has {held} bytes of DMA windows; {size} more would "
                    f"pass the limit of {self.max_bytes} (limits.max_dma_bytes_per_guest); "
                    "unmap some or map less",
                    code=ErrorCode.BUSY,
                )
            if size < 1:
                raise DmaMapError(
                    "a DMA window needs at least one byte", code=ErrorCode.INVALID_SIZE
                )
            if offset % PAGE_SIZE:
                raise DmaMapError(
                    f"a DMA window's file offset must be page aligned, not {offset:#x}",
                    code=ErrorCode.INVALID_OFFSET,
                )
            memory = _validate_memfd(fd, size, writable, offset) if fd is not None else None
        except DmaMapError:
            self.stats.refused_maps += 1
            if fd is not None:
                os.close(fd)
            raise
        try:
            if bus_address is None:
                address = self._iova.allocate(size)
            else:
                self._iova.reserve(bus_address, size)
                address = bus_address
        except DmaMapError:
            self.stats.refused_maps += 1
            if memory is not None:
                memory.close()
            if fd is not None:
                os.close(fd)
            raise
        window = DmaWindow(
            address, size, writable, owner, memory=memory, fd=-1 if fd is None else fd
        )
        bisect.insort(self._starts, address)
        self._windows[address] = window
        self.stats.maps += 1
        return address

    async def unmap(self, bus_address: int, owner: DmaCaller) -> None:
        """Unmap the window at ``bus_address`` once its in-flight DMA has finished."""
        window = self._windows.get(bus_address)
        if window is None or window.owner is not owner:
            raise DmaMapError(
                f"no DMA window starts at bus address {bus_address:#x} on this connection; "
                "unmap the exact address the map request returned",
                code=ErrorCode.NOT_FOUND,
            )
        self._detach(window)
        await window.wait_idle()
        self._destroy(window)

    async def teardown(self, owner: DmaCaller) -> None:
        """Unmap every window of a session that ended (after their in-flight DMA)."""
        if owner in self._reporters:
            self._reporters.remove(owner)
        mine = [w for w in self._windows.values() if w.owner is owner]
        for window in mine:
            self._detach(window)
        # Windows whose unmap was interrupted (the connection ended meanwhile) too.
        mine += [w for w in self._closing if w.owner is owner and w not in mine]
        with trio.CancelScope(shield=True):
            for window in mine:
                await window.wait_idle()
                self._destroy(window)

    def _detach(self, window: DmaWindow) -> None:
        # From here on a new DMA to the window faults; its address stays reserved
        # until the memory is really gone, so it is not reused while DMA is in flight.
        window.closing = True
        self._starts.remove(window.bus_address)
        del self._windows[window.bus_address]
        self._closing.add(window)

    def _destroy(self, window: DmaWindow) -> None:
        if window not in self._closing:
            return  # already released (an unmap and a teardown raced)
        self._closing.discard(window)
        window.release()
        self._iova.free(window.bus_address)
        self.stats.unmaps += 1

    # -- device DMA ---------------------------------------------------------------------

    def _find(self, address: int, length: int) -> DmaWindow | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        window = self._windows[self._starts[i]]
        if address + length > window.end:
            return None  # crosses the window's end: a fault, never a partial copy
        return window

    def _fault(self, device: int, address: int, length: int, is_write: bool, why: str) -> None:
        self.stats.faults += 1
        what = "write" if is_write else "read"
        message = f"DMA {what} of {length} bytes at {address:#x}: {why}"
        event = DmaFaultEvent(device, address & 0xFFFF_FFFF_FFFF_FFFF, length, is_write, message)
        for reporter in self._reporters:
            reporter.report_fault(event)
        raise DmaFaultError(message)

    async def read(self, device: int, address: int, length: int) -> bytes:
        """Device ``device`` (packed virtual address) reads guest memory."""
        if length < 1:
            raise PcisplitError("a DMA read needs length >= 1", code=ErrorCode.INVALID_SIZE)
        window = self._find(address, length)
        if window is None:
            self._fault(device, address, length, False, "outside every window the guest mapped")
        assert window is not None
        self.stats.reads += 1
        window.enter()
        try:
            offset = address - window.bus_address
            if window.memory is not None:
                # One copy out of guest-controlled memory; only the copy is used.
                data = window.memory[offset : offset + length]
            else:
                data = await self._read_calls(window, address, length)
        finally:
            window.leave()
        self.stats.bytes_read += length
        return data

    async def write(self, device: int, address: int, data: bytes) -> None:
        """Device ``device`` writes guest memory."""
        length = len(data)
        if length < 1:
            raise PcisplitError("a DMA write needs at least one byte", code=ErrorCode.INVALID_SIZE)
        window = self._find(address, length)
        if window is None:
            self._fault(device, address, length, True, "outside every window the guest mapped")
        assert window is not None
        if not window.writable:
            self._fault(device, address, length, True, "the window is mapped read-only")
        self.stats.writes += 1
        window.enter()
        try:
            offset = address - window.bus_address
            if window.memory is not None:
                window.memory[offset : offset + length] = data
            else:
                await self._write_calls(window, address, bytes(data))
        finally:
            window.leave()
        self.stats.bytes_written += length

    async def _read_calls(self, window: DmaWindow, address: int, length: int) -> bytes:
        owner = window.owner
        chunk = min(MAX_DMA_CHUNK, owner.chunk_size())
        parts = []
        done = 0
        while done < length:
            n = min(chunk, length - done)
            self.stats.calls += 1
            part = await owner.dma_read_call(address + done, n, self.call_timeout)
            if len(part) != n:
                raise DmaFaultError(
                    f"the frontend answered a {n}-byte DMA read at {address + done:#x} with "
                    f"{len(part)} bytes; transfer abandoned"
                )
            parts.append(part)
            done += n
        return b"".join(parts)

    async def _write_calls(self, window: DmaWindow, address: int, data: bytes) -> None:
        owner = window.owner
        chunk = min(MAX_DMA_CHUNK, owner.chunk_size())
        for start in range(0, len(data), chunk):
            self.stats.calls += 1
            await owner.dma_write_call(
                address + start, data[start : start + chunk], self.call_timeout
            )


class DeviceDma:
    """One device's view of DMA: the windows of whichever guest owns it right now."""

    def __init__(self, hub: DmaHub, served: ServedDevice) -> None:
        self._hub = hub
        self._served = served

    def _space(self, address: int, length: int, is_write: bool) -> tuple[GuestDma, int]:
        served = self._served
        guest = served.guest
        space = self._hub.get(guest) if guest is not None else None
        if space is None or served.address is None:
            what = "write" if is_write else "read"
            raise DmaFaultError(
                f"DMA {what} of {length} bytes at {address:#x} by {served.id}: the device has "
                "no guest with DMA windows"
            )
        return space, served.address.pack()

    async def read(self, address: int, length: int) -> bytes:
        space, device = self._space(address, length, False)
        return await space.read(device, address, length)

    async def write(self, address: int, data: bytes) -> None:
        space, device = self._space(address, len(data), True)
        await space.write(device, address, data)


class DmaHub:
    """The backend-wide table of guests' DMA spaces."""

    def __init__(
        self,
        *,
        call_timeout: float = 5.0,
        max_windows: int | None = None,
        max_bytes: int | None = None,
        limit_events: Counter[str] | None = None,
    ) -> None:
        self.call_timeout = call_timeout
        self.max_windows = max_windows
        self.max_bytes = max_bytes
        self.limit_events: Counter[str] = Counter() if limit_events is None else limit_events
        self._spaces: dict[str, GuestDma] = {}

    def space(self, guest: str) -> GuestDma:
        """``guest``'s DMA space, created on first use."""
        space = self._spaces.get(guest)
        if space is None:
            space = self._spaces[guest] = GuestDma(
                guest,
                call_timeout=self.call_timeout,
                max_windows=self.max_windows,
                max_bytes=self.max_bytes,
                limit_events=self.limit_events,
            )
        return space

    def get(self, guest: str) -> GuestDma | None:
        return self._spaces.get(guest)

    def device(self, served: ServedDevice) -> DeviceDma:
        return DeviceDma(self, served)
