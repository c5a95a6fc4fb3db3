"""Legacy configuration access for emulators and VMMs: CF8/CFC (Mechanism #1) and ECAM.

:class:`PortIO` emulates I/O ports 0xCF8 (the address latch) and 0xCFC-0xCFF
(the data window) over a guest's :class:`~pcifront.Bus`; :class:`Ecam` is a
memory-mapped (MMCONFIG) window with the bus, device, function and register
in the offset. Both answer all ones for an absent function, a disabled
access or a register past a function's config space, as a root complex does.

**The address and data phases of one user never interleave with another's.**
With one shared latch (as on hardware, and in Xen's pcifront), user A's
``out 0xCF8`` can be overwritten by user B's before A's ``in 0xCFC``, and A
reads B's register. Here every user has its own latch: by default each trio
task is a user (``io.read``/``io.write`` use the calling task's latch), and
``io.session()`` hands out an explicit per-user handle (one per emulated
vCPU, say) whose latch no one else touches. ``io.config_read(bdf, offset,
size)`` and ``io.config_write(...)`` do both phases in one call. The data
phase itself is one request to the backend, so it is atomic too.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Final

import trio

from pcifront.client.bus import Bus, Device
from pcifront.core.errors import InvalidAccessError
from shared.errors import ErrorCode, PcisplitError
from shared.pci import PciAddress

__all__ = ["PortIO", "PortIOSession", "Ecam", "LegacyAccessError", "CONFIG_ADDRESS",
           "CONFIG_DATA", "ECAM_SIZE"]

#: The address latch port and the first data port of Configuration Mechanism #1.
CONFIG_ADDRESS: Final = 0xCF8
CONFIG_DATA: Final = 0xCFC
_ENABLE: Final = 1 << 31
#: The window ECAM decodes: 256 buses x 32 devices x 8 functions x 4 KiB.
ECAM_SIZE: Final = 256 << 20
_SIZES: Final = (1, 2, 4)


class LegacyAccessError(PcisplitError):
    """An access no emulated port or window accepts (wrong port, size or alignment)."""

    code = ErrorCode.INVALID_OFFSET


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


def _device(bus: Bus, bus_number: int, device: int, function: int) -> Device | None:
    wanted = PciAddress(0, bus_number, device, function)
    for candidate in bus.devices:
        if candidate.pci_address == wanted:
            return candidate
    return None


async def _read(bus: Bus, address: PciAddress, offset: int, size: int) -> int:
    device = _device(bus, address.bus, address.device, address.function)
    if device is None:
        return _ones(size)  # no function answers: master abort
    try:
        return await device.config_read(offset, size)
    except InvalidAccessError:
        return _ones(size)  # past this function's config space


async def _write(bus: Bus, address: PciAddress, offset: int, size: int, value: int) -> bool:
    """Write; False when no function took it (absent, or past its config space)."""
    device = _device(bus, address.bus, address.device, address.function)
    if device is None:
        return False
    try:
        await device.config_write(offset, size, value)
    except InvalidAccessError:
        return False
    return True


@dataclass
class LegacyStatistics:
    """Accesses that reached no function (answered with all ones, or writes dropped)."""

    unclaimed_reads: int = 0
    dropped_writes: int = 0


class PortIOSession:
    """One user's view of ports 0xCF8-0xCFF: its own address latch."""

    def __init__(self, io: PortIO) -> None:
        self._io = io
        #: The value last written to 0xCF8 by this user.
        self.latch = 0

    def _target(self, port: int, size: int) -> tuple[PciAddress, int] | None:
        """(function, register offset) the data port access addresses, None when disabled."""
        lane = port - CONFIG_DATA
        if size not in _SIZES or not lane >= 0 or lane + size > 4 or lane % size:
            raise LegacyAccessError(
                f"a {size}-byte access at port {port:#x} is not a data-port access; use 1, 2 "
                "or 4 bytes at 0xcfc-0xcff, naturally aligned"
            )
        latch = self.latch
        if not latch & _ENABLE:
            return None
        address = PciAddress(0, (latch >> 16) & 0xFF, (latch >> 11) & 0x1F, (latch >> 8) & 0x7)
        # Bits 27:24 extend the register number to 4 KiB (AMD's extended CF8 access).
        offset = ((latch >> 16) & 0xF00) | (latch & 0xFC)
        return address, offset + lane

    async def read(self, port: int, size: int) -> int:
        """``in`` from ``port``: the latch at 0xCF8 (4 bytes), or config data at 0xCFC-0xCFF."""
        if port == CONFIG_ADDRESS:
            if size != 4:
                raise LegacyAccessError("0xcf8 is a 4-byte register; read it with size 4")
            return self.latch
        target = self._target(port, size)
        if target is None:
            self._io.stats.unclaimed_reads += 1
            return _ones(size)
        address, offset = target
        if _device(self._io.bus, address.bus, address.device, address.function) is None:
            self._io.stats.unclaimed_reads += 1
        return await _read(self._io.bus, address, offset, size)

    async def write(self, port: int, size: int, value: int) -> None:
        """``out`` to ``port``: set the latch (0xCF8, 4 bytes) or write config data."""
        if not 0 <= value <= _ones(size if size in _SIZES else 4):
            raise LegacyAccessError(f"value {value:#x} does not fit {size} byte(s)")
        if port == CONFIG_ADDRESS:
            if size != 4:
                raise LegacyAccessError("0xcf8 is a 4-byte register; write it with size 4")
            self.latch = value & 0x8FFF_FFFC  # bits 30:28 and 1:0 are reserved: read as 0
            return
        target = self._target(port, size)
        if target is None or not await _write(self._io.bus, *target, size, value):
            self._io.stats.dropped_writes += 1

    async def config_read(self, address: PciAddress, offset: int, size: int) -> int:
        """Both phases of a read in one call (see :meth:`PortIO.config_read`)."""
        await self.write(CONFIG_ADDRESS, 4, _latch_for(address, offset))
        return await self.read(CONFIG_DATA + (offset & 3), size)

    async def config_write(self, address: PciAddress, offset: int, size: int, value: int) -> None:
        """Both phases of a write in one call."""
        await self.write(CONFIG_ADDRESS, 4, _latch_for(address, offset))
        await self.write(CONFIG_DATA + (offset & 3), size, value)


def _latch_for(address: PciAddress, offset: int) -> int:
    if not 0 <= offset < 4096:
        raise LegacyAccessError(f"register offset {offset:#x} is out of range 0..0xfff")
    return (
        _ENABLE | ((offset & 0xF00) << 16) | (address.bus << 16) | (address.device << 11)
        | (address.function << 8) | (offset & 0xFC)
    )


class PortIO:
    """Configuration Mechanism #1 (ports 0xCF8-0xCFF) over ``bus`` (see the module doc).

    ``await io.read(port, size)`` / ``await io.write(port, size, value)`` act
    with the calling task's own latch; ``io.session()`` returns an explicit
    per-user handle with the same methods.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.stats = LegacyStatistics()
        self._by_task: weakref.WeakKeyDictionary[trio.lowlevel.Task, PortIOSession] = (
            weakref.WeakKeyDictionary()
        )

    def session(self) -> PortIOSession:
        """A new user of the ports, with a latch of its own."""
        return PortIOSession(self)

    def _mine(self) -> PortIOSession:
        task = trio.lowlevel.current_task()
        session = self._by_task.get(task)
        if session is None:
            session = self._by_task[task] = PortIOSession(self)
        return session

    async def read(self, port: int, size: int) -> int:
        return await self._mine().read(port, size)

    async def write(self, port: int, size: int, value: int) -> None:
        await self._mine().write(port, size, value)

    async def config_read(self, bdf: PciAddress | str, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` of function ``bdf``: latch and data, atomically."""
        return await self.session().config_read(_bdf(bdf), offset, size)

    async def config_write(self, bdf: PciAddress | str, offset: int, size: int, value: int) -> None:
        """Write ``value`` at ``offset`` of function ``bdf``: latch and data, atomically."""
        await self.session().config_write(_bdf(bdf), offset, size, value)


def _bdf(bdf: PciAddress | str) -> PciAddress:
    return bdf if isinstance(bdf, PciAddress) else PciAddress.parse(bdf)


class Ecam:
    """An ECAM (MMCONFIG) window over ``bus``: offset = bus << 20 | dev << 15 | fn << 12 | reg.

    Covers the full 4 KiB config space of every function; accesses are 1, 2 or
    4 bytes, naturally aligned. Reads of absent functions (or past a
    function's config space) return all ones; writes there are dropped and
    counted in :attr:`stats`.
    """

    size: Final = ECAM_SIZE

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.stats = LegacyStatistics()

    @staticmethod
    def _decode(offset: int, size: int) -> tuple[PciAddress, int]:
        if size not in _SIZES or offset % size or not 0 <= offset <= ECAM_SIZE - size:
            raise LegacyAccessError(
                f"a {size}-byte ECAM access at offset {offset:#x} is invalid; use 1, 2 or 4 "
                f"bytes, naturally aligned, below {ECAM_SIZE:#x}"
            )
        address = PciAddress(0, offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7)
        return address, offset & 0xFFF

    @staticmethod
    def offset_of(address: PciAddress | str, register: int = 0) -> int:
        """The window offset of ``register`` of function ``address``."""
        a = _bdf(address)
        return (a.bus << 20) | (a.device << 15) | (a.function << 12) | register

    async def read(self, offset: int, size: int) -> int:
        address, register = self._decode(offset, size)
        if _device(self.bus, address.bus, address.device, address.function) is None:
            self.stats.unclaimed_reads += 1
        return await _read(self.bus, address, register, size)

    async def write(self, offset: int, size: int, value: int) -> None:
        address, register = self._decode(offset, size)
        if not 0 <= value <= _ones(size):
            raise LegacyAccessError(f"value {value:#x} does not fit {size} byte(s)")
        if not await _write(self.bus, address, register, size, value):
            self.stats.dropped_writes += 1
