"""Base Address Registers: decoding a config image, and the masks sizing returns.

A BAR register holds an address in its upper bits and read-only flags in its
low bits (``BarFlag``): bit 0 selects I/O space; for memory, bits 2:1 give the
type (32-bit, below-1M legacy, 64-bit) and bit 3 prefetchability. A 64-bit
memory BAR uses the next register for the upper half. Sizing works by writing
all ones and reading back: the device returns the address bits it does not
decode as 0, which is exactly what :func:`bar_size_mask` computes.

All functions here are pure: they take bytes and integers and return values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shared.errors import PciError
from shared.pci._config import ConfigSpace
from shared.pci._constants import ROM_ENABLE, BarFlag, BridgeReg, Reg

__all__ = [
    "BarKind",
    "BarInfo",
    "RomInfo",
    "decode_bars",
    "decode_expansion_rom",
    "bar_count",
    "bar_size_mask",
    "rom_size_mask",
    "expansion_rom_offset",
    "BAR_IO_ADDRESS_MASK",
    "BAR_MEM_ADDRESS_MASK",
    "ROM_ADDRESS_MASK",
]

#: Address bits of an I/O BAR (bits 1:0 are flags).
BAR_IO_ADDRESS_MASK = 0xFFFF_FFFC
#: Address bits of a memory BAR (bits 3:0 are flags).
BAR_MEM_ADDRESS_MASK = 0xFFFF_FFF0
#: Address bits of the expansion ROM BAR (bits 10:1 are reserved, bit 0 enables).
ROM_ADDRESS_MASK = 0xFFFF_F800

_MEM_TYPE_MASK = 0x6
_MEM_TYPE_64 = 0x4
_IO_FLAG_MASK = 0x3
_MEM_FLAG_MASK = 0xF
_LAYOUT_MASK = 0x7F
_ROM_MIN_SIZE = 2048
_IO_MAX_SIZE = 256  # PCI 3.0 6.2.5.1: an I/O BAR claims at most 256 bytes


class BarKind(enum.Enum):
    """What a BAR decodes (also used by ``pciback.devices.BarSpec``).

    The legacy "below 1 MiB" memory type and the reserved type 3 decode as
    ``MEM32``; their raw type bits stay visible in :attr:`BarInfo.raw`.
    """

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass(frozen=True, slots=True)
class BarInfo:
    """One decoded BAR (a 64-bit pair counts as one).

    ``base`` is the address with the flag bits cleared (both halves for a
    64-bit BAR). ``raw`` is the register value as stored: the lower dword, or
    ``lower | upper << 32`` for a 64-bit BAR. ``slots`` lists the BAR indexes
    the BAR consumes: ``(i,)``, or ``(i, i + 1)`` for a 64-bit pair. A 64-bit
    BAR in the last slot has no upper register: it is decoded with an upper
    half of 0 and ``slots == (i,)``.
    """

    index: int
    offset: int
    kind: BarKind
    prefetchable: bool
    base: int
    raw: int
    slots: tuple[int, ...]

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def is_64bit(self) -> bool:
        return self.kind is BarKind.MEM64

    @property
    def flags(self) -> int:
        """The read-only flag bits of the (lower) register."""
        return self.raw & (_IO_FLAG_MASK if self.is_io else _MEM_FLAG_MASK)

    @property
    def is_zero(self) -> bool:
        """True when every register of the BAR reads 0 (unimplemented or unassigned)."""
        return self.raw == 0


@dataclass(frozen=True, slots=True)
class RomInfo:
    """The decoded expansion ROM BAR."""

    offset: int
    base: int
    enabled: bool
    raw: int


def bar_count(header_type: int) -> int:
    """How many BAR registers a header type has: 6 (type 0), 2 (type 1), 1 (type 2).

    The multi-function bit (0x80) is ignored. Other header types have no
    defined layout and raise :class:`PciError`.
    """
    layout = header_type & _LAYOUT_MASK
    counts = {0: 6, 1: 2, 2: 1}
    if layout not in counts:
        raise PciError(
            f"header type {layout:#x} has no defined BAR layout; only types 0 (endpoint), "
            "1 (PCI bridge) and 2 (CardBus bridge) exist"
        )
    return counts[layout]


def expansion_rom_offset(header_type: int) -> int:
    """Offset of the expansion ROM BAR: 0x30 for type 0, 0x38 for type 1.

    CardBus bridges (type 2) and undefined types have none: :class:`PciError`.
    """
    layout = header_type & _LAYOUT_MASK
    if layout == 0:
        return int(Reg.ROM_ADDRESS)
    if layout == 1:
        return int(BridgeReg.ROM_ADDRESS)
    raise PciError(f"header type {layout:#x} has no expansion ROM BAR; only types 0 and 1 have one")


def _raw(data: bytes | bytearray | memoryview | ConfigSpace) -> bytes:
    raw = bytes(data)
    if len(raw) < 0x40:
        raise PciError(
            f"a config image of {len(raw)} bytes is shorter than the 64-byte header; "
            "BARs cannot be decoded"
        )
    return raw


def _dword(raw: bytes, offset: int) -> int:
    return int.from_bytes(raw[offset : offset + 4], "little")


def decode_bars(data: bytes | bytearray | memoryview | ConfigSpace) -> list[BarInfo]:
    """Decode every BAR of a config image, in index order.

    One :class:`BarInfo` per BAR: six register slots on a type 0 header, two on
    a type 1 bridge, one on a CardBus bridge; a 64-bit pair yields one entry
    that consumes two slots. BARs that read 0 are included (see
    :attr:`BarInfo.is_zero`): the image alone cannot tell an unimplemented BAR
    from an unassigned one.
    """
    raw = _raw(data)
    count = bar_count(raw[Reg.HEADER_TYPE])
    bars: list[BarInfo] = []
    index = 0
    while index < count:
        offset = Reg.BAR0 + 4 * index
        lower = _dword(raw, offset)
        if lower & BarFlag.IO_SPACE:
            bars.append(
                BarInfo(
                    index, offset, BarKind.IO, False, lower & BAR_IO_ADDRESS_MASK, lower, (index,)
                )
            )
            index += 1
            continue
        prefetchable = bool(lower & BarFlag.PREFETCH)
        if lower & _MEM_TYPE_MASK == _MEM_TYPE_64:
            has_upper = index + 1 < count
            upper = _dword(raw, offset + 4) if has_upper else 0
            value = lower | (upper << 32)
            slots = (index, index + 1) if has_upper else (index,)
            base = value & ~_MEM_FLAG_MASK
            bars.append(BarInfo(index, offset, BarKind.MEM64, prefetchable, base, value, slots))
            index += len(slots)
            continue
        base = lower & BAR_MEM_ADDRESS_MASK
        bars.append(BarInfo(index, offset, BarKind.MEM32, prefetchable, base, lower, (index,)))
        index += 1
    return bars


def decode_expansion_rom(data: bytes | bytearray | memoryview | ConfigSpace) -> RomInfo:
    """Decode the expansion ROM BAR of a type 0 or type 1 image."""
    raw = _raw(data)
    offset = expansion_rom_offset(raw[Reg.HEADER_TYPE])
    value = _dword(raw, offset)
    return RomInfo(offset, value & ROM_ADDRESS_MASK, bool(value & ROM_ENABLE), value)


def _check_power_of_two(size: int, minimum: int, maximum: int, what: str) -> None:
    if not isinstance(size, int) or isinstance(size, bool):
        raise PciError(f"{what} size must be an int, not {type(size).__name__}")
    if size < minimum or size > maximum or size & (size - 1):
        raise PciError(
            f"{what} size {size:#x} is invalid: it must be a power of two between "
            f"{minimum:#x} and {maximum:#x}"
        )


def bar_size_mask(size: int, flags: int, is_64_upper: bool = False) -> int:
    """The 32-bit value a BAR register reads after all ones were written to it.

    ``flags`` are the BAR's read-only low bits (``BarFlag``: ``IO_SPACE``, or
    any of ``MEM_TYPE_64`` / ``PREFETCH``); they are kept in the result, as
    hardware keeps them. For a 64-bit BAR pass ``is_64_upper=True`` to get the
    upper register's value (no flag bits there).

    Limits: I/O BARs 4..256 bytes; 32-bit memory BARs 16 bytes..2 GiB; 64-bit
    memory BARs 16 bytes..2**63. Anything else raises :class:`PciError`.
    """
    if flags & BarFlag.IO_SPACE:
        if flags & ~_IO_FLAG_MASK or flags & 0x2:
            raise PciError(f"I/O BAR flags {flags:#x} are invalid; an I/O BAR has only bit 0 set")
        if is_64_upper:
            raise PciError("an I/O BAR has no upper half; is_64_upper needs a 64-bit memory BAR")
        _check_power_of_two(size, 4, _IO_MAX_SIZE, "I/O BAR")
        return (~(size - 1) & BAR_IO_ADDRESS_MASK) | (flags & _IO_FLAG_MASK)
    if flags & ~_MEM_FLAG_MASK:
        raise PciError(f"memory BAR flags {flags:#x} have bits outside the low four")
    is_64 = flags & _MEM_TYPE_MASK == _MEM_TYPE_64
    if is_64_upper and not is_64:
        raise PciError("is_64_upper needs a 64-bit memory BAR (flags with BarFlag.MEM_TYPE_64)")
    if is_64:
        _check_power_of_two(size, 16, 1 << 63, "64-bit memory BAR")
        mask = ~(size - 1) & 0xFFFF_FFFF_FFFF_FFFF
        if is_64_upper:
            return mask >> 32
        return (mask & BAR_MEM_ADDRESS_MASK) | flags
    _check_power_of_two(size, 16, 1 << 31, "32-bit memory BAR")
    return (~(size - 1) & BAR_MEM_ADDRESS_MASK) | flags


def rom_size_mask(size: int) -> int:
    """The address bits an expansion ROM BAR of ``size`` bytes reads back after sizing.

    The enable bit (bit 0) is read/write and not part of the mask: OR it in
    if it was written. ``size`` is a power of two from 2 KiB to 2 GiB.
    """
    _check_power_of_two(size, _ROM_MIN_SIZE, 1 << 31, "expansion ROM")
    return ~(size - 1) & ROM_ADDRESS_MASK
