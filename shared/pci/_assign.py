"""Firmware-like resource assignment: address windows, natural alignment, virtual IRQs.

A guest normally meets its PCI devices after firmware (SeaBIOS, OVMF, Xen's
hvmloader) has sized every BAR and given it an address. The backend does the
same for each guest's virtual bus when a device is assigned, with the pure
allocator here:

* a guest has three windows (:class:`GuestWindows`): 32-bit MMIO below
  4 GiB, 64-bit MMIO above it, and an I/O port window;
* a BAR gets the lowest naturally aligned address (a multiple of its size)
  that is free in its window: I/O BARs in the I/O window; 32-bit memory BARs
  and the expansion ROM below 4 GiB; 64-bit prefetchable BARs above 4 GiB
  (falling back below it); 64-bit non-prefetchable BARs below 4 GiB (falling
  back above it), which is what Linux does, because a bridge's
  non-prefetchable window is 32-bit;
* larger BARs are placed first, so small ones fill the gaps (less waste);
* a BAR with a fixed address (a snapshot's own programmed address) is only
  reserved, wherever it lies, so nothing else is placed on top of it;
* the interrupt line gets an ISA IRQ by the usual PCI swizzle
  (:func:`virtual_irq`).

Pure: nothing here does I/O or knows about guests or sessions.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from shared.errors import PciError
from shared.pci._bars import BarKind

__all__ = [
    "Window",
    "GuestWindows",
    "DEFAULT_WINDOWS",
    "ResourceRequest",
    "ResourceAssignment",
    "WindowAllocator",
    "AssignmentError",
    "virtual_irq",
    "GUEST_ISA_IRQS",
    "ROM_RESOURCE",
]

#: The resource index of the expansion ROM (sysfs ``resource`` line 6).
ROM_RESOURCE: Final = 6
#: The ISA IRQs a guest's INTA..INTD links route to (hvmloader uses 5, 10 and 11).
GUEST_ISA_IRQS: Final = (10, 11, 5, 9)
_FOUR_GIB: Final = 1 << 32
_IO_TOP: Final = 1 << 16


class AssignmentError(PciError):
    """A window description is invalid, or a resource request is malformed."""


@dataclass(frozen=True, slots=True)
class Window:
    """An address range ``[base, base + size)``."""

    base: int
    size: int

    def __post_init__(self) -> None:
        if self.base < 0 or self.size <= 0:
            raise AssignmentError(
                f"window {self.base:#x}+{self.size:#x}: base must be >= 0 and size > 0"
            )

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.size

    def __str__(self) -> str:
        return f"{self.base:#x}-{self.end - 1:#x}"


@dataclass(frozen=True, slots=True)
class GuestWindows:
    """The three address windows of one guest's virtual bus."""

    mmio32: Window
    mmio64: Window
    io: Window

    def __post_init__(self) -> None:
        if self.mmio32.end > _FOUR_GIB:
            raise AssignmentError(f"the 32-bit MMIO window {self.mmio32} must end below 4 GiB")
        if self.mmio64.base < _FOUR_GIB:
            raise AssignmentError(f"the 64-bit MMIO window {self.mmio64} must start at 4 GiB")
        if self.io.end > _IO_TOP:
            raise AssignmentError(f"the I/O window {self.io} must end below 0x10000")


#: 32-bit MMIO from 3 GiB up to the I/O APIC (0xfec00000), 512 GiB of 64-bit MMIO at
#: 512 GiB, and I/O ports 0xc000-0xffff (where hvmloader starts too).
DEFAULT_WINDOWS: Final = GuestWindows(
    mmio32=Window(0xC000_0000, 0xFEC0_0000 - 0xC000_0000),
    mmio64=Window(1 << 39, 1 << 39),
    io=Window(0xC000, 0x4000),
)


@dataclass(frozen=True, slots=True)
class ResourceRequest:
    """One BAR (index 0-5) or the expansion ROM (index 6) that wants an address.

    ``fixed`` is an address the resource must keep (a snapshot's programmed
    address): it is reserved, not placed.
    """

    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False
    fixed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.index <= ROM_RESOURCE:
            raise AssignmentError(f"resource index {self.index} is out of range 0..6")
        if self.size <= 0 or self.size & (self.size - 1):
            raise AssignmentError(f"resource {self.index}: size {self.size:#x} is not a power of 2")
        if self.fixed is not None and self.fixed < 0:
            raise AssignmentError(f"resource {self.index}: fixed address {self.fixed:#x} < 0")

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO


@dataclass(frozen=True, slots=True)
class ResourceAssignment:
    """Where one resource went. ``address`` is None when no window had room."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool
    address: int | None

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO


@dataclass
class _Space:
    """Occupied ranges of one address space, sorted by base: (base, end, owner)."""

    ranges: list[tuple[int, int, str]] = field(default_factory=list)

    def add(self, base: int, end: int, owner: str) -> None:
        bisect.insort(self.ranges, (base, end, owner))

    def first_fit(self, window: Window, size: int) -> int | None:
        candidate = _align_up(window.base, size)
        for base, end, _owner in self.ranges:
            if end <= candidate:
                continue
            if base >= candidate + size:
                break
            candidate = _align_up(end, size)
        return candidate if candidate + size <= window.end else None

    def release(self, owner: str) -> None:
        self.ranges = [entry for entry in self.ranges if entry[2] != owner]


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class WindowAllocator:
    """Hands out naturally aligned addresses in one guest's windows (see module doc).

    ``owner`` names whoever holds a range (a device id), so :meth:`release`
    frees everything a device had when it leaves the bus.
    """

    def __init__(self, windows: GuestWindows = DEFAULT_WINDOWS) -> None:
        self.windows = windows
        self._memory = _Space()
        self._io = _Space()

    def allocate(
        self, owner: str, requests: Iterable[ResourceRequest]
    ) -> list[ResourceAssignment]:
        """Place (or reserve) every request of ``owner``; returns them in index order.

        Fixed requests are reserved first, then the rest largest first. A
        request no window can hold gets ``address=None`` (the caller leaves
        that BAR unassigned, as firmware does when it runs out of space).
        """
        wanted = list(requests)
        indexes = [request.index for request in wanted]
        if len(set(indexes)) != len(indexes):
            raise AssignmentError(f"{owner}: resource indexes repeat: {indexes}")
        placed: dict[int, ResourceAssignment] = {}
        for request in wanted:
            if request.fixed is not None:
                self._space(request).add(request.fixed, request.fixed + request.size, owner)
                placed[request.index] = self._result(request, request.fixed)
        movable = [request for request in wanted if request.fixed is None]
        movable.sort(key=lambda request: (-request.size, request.index))
        for request in movable:
            address = None
            space = self._space(request)
            for window in self._windows_for(request):
                address = space.first_fit(window, request.size)
                if address is not None:
                    space.add(address, address + request.size, owner)
                    break
            placed[request.index] = self._result(request, address)
        return [placed[index] for index in sorted(placed)]

    def release(self, owner: str) -> None:
        """Free every range ``owner`` holds."""
        self._memory.release(owner)
        self._io.release(owner)

    def occupied(self) -> list[tuple[str, int, int, str]]:
        """``(space, base, end, owner)`` for every held range (``space`` is io or memory)."""
        return [("io", *entry) for entry in self._io.ranges] + [
            ("memory", *entry) for entry in self._memory.ranges
        ]

    def _space(self, request: ResourceRequest) -> _Space:
        return self._io if request.is_io else self._memory

    def _windows_for(self, request: ResourceRequest) -> tuple[Window, ...]:
        windows = self.windows
        if request.is_io:
            return (windows.io,)
        if request.kind is BarKind.MEM64:
            if request.prefetchable:
                return (windows.mmio64, windows.mmio32)
            return (windows.mmio32, windows.mmio64)
        return (windows.mmio32,)

    @staticmethod
    def _result(request: ResourceRequest, address: int | None) -> ResourceAssignment:
        return ResourceAssignment(
            request.index, request.size, request.kind, request.prefetchable, address
        )


def virtual_irq(device: int, pin: int) -> int | None:
    """The ISA IRQ a function's interrupt pin routes to on the virtual bus.

    ``pin`` is the Interrupt Pin register (1-4 for INTA-INTD, 0 for none);
    ``device`` the slot number. The standard swizzle spreads slots over the
    four links: ``(device + pin - 1) % 4``. None when the function has no pin.
    """
    if not 0 <= device <= 31:
        raise AssignmentError(f"device number {device} is out of range 0..31")
    if pin == 0:
        return None
    if not 1 <= pin <= 4:
        raise AssignmentError(f"interrupt pin {pin} is out of range 0..4")
    return GUEST_ISA_IRQS[(device + pin - 1) % 4]
