"""A config-space image with per-byte write and write-1-to-clear masks.

This is the register engine behind emulated and snapshot devices. It follows
QEMU's model (``config``/``wmask``/``w1cmask``): every byte has a mask of bits
a write may change and a mask of bits a written 1 clears. Read-only fields are
simply bytes whose masks are zero, so one small engine gives IDs, capability
headers, RW1C status bits and BAR sizing their hardware semantics.

BAR sizing falls out of the masks too: a BAR's address bits below its size are
read-only zeros and its flag bits are read-only, so writing all ones and
reading back yields ``~(size - 1) | flags``, exactly as hardware answers.
"""

from __future__ import annotations

from shared.errors import ConfigAccessError, ErrorCode, PciError
from shared.pci import (
    ROM_ENABLE,
    Command,
    Reg,
    Status,
    bar_size_mask,
    check_access,
    rom_size_mask,
)

from ._base import BarKind, BarSpec, DeviceSetupError

__all__ = [
    "RegisterFile",
    "COMMAND_WRITABLE",
    "STATUS_RW1C",
    "bar_masks",
    "rom_mask",
    "apply_header_masks",
]

#: Command bits a guest may change on an emulated device; the rest are hardwired 0.
COMMAND_WRITABLE = int(
    Command.IO
    | Command.MEMORY
    | Command.MASTER
    | Command.PARITY
    | Command.SERR
    | Command.INTX_DISABLE
)
#: Status error bits that hardware clears when software writes 1 to them.
STATUS_RW1C = int(
    Status.PARITY
    | Status.SIG_TARGET_ABORT
    | Status.REC_TARGET_ABORT
    | Status.REC_MASTER_ABORT
    | Status.SIG_SYSTEM_ERROR
    | Status.DETECTED_PARITY
)


def bar_masks(spec: BarSpec) -> list[tuple[int, int, int]]:
    """``(register offset, power-on flag bits, write mask)`` for each dword of a BAR.

    The write mask is the sizing answer without the flag bits: the address
    bits at and above the BAR's size.
    """
    offset = Reg.BAR0 + 4 * spec.index
    try:
        low = bar_size_mask(spec.size, spec.flags) & ~spec.flags
        if spec.kind is not BarKind.MEM64:
            return [(offset, spec.flags, low)]
        high = bar_size_mask(spec.size, spec.flags, is_64_upper=True)
    except PciError as exc:
        raise DeviceSetupError(f"BAR{spec.index}: {exc.message}") from exc
    return [(offset, spec.flags, low), (offset + 4, 0, high)]


def rom_mask(size: int) -> int:
    """The write mask of an expansion-ROM register: its address bits and the enable bit."""
    try:
        return rom_size_mask(size) | ROM_ENABLE
    except PciError as exc:
        raise DeviceSetupError(exc.message) from exc


class RegisterFile:
    """Config bytes, their power-on copy, and per-byte write/RW1C masks."""

    __slots__ = ("_data", "_power_on", "_w1cmask", "_wmask")

    def __init__(self, size: int) -> None:
        if size not in (64, 256, 4096):
            raise DeviceSetupError(f"config space size {size} must be 64, 256 or 4096")
        self._data = bytearray(size)
        self._power_on = bytearray(size)
        self._wmask = bytearray(size)
        self._w1cmask = bytearray(size)

    @property
    def size(self) -> int:
        return len(self._data)

    # -- building (power-on state) ---------------------------------------------------------

    def init(self, offset: int, data: bytes) -> None:
        """Set power-on bytes (and the live bytes) at ``offset``."""
        self._bound(offset, len(data))
        self._power_on[offset : offset + len(data)] = data
        self._data[offset : offset + len(data)] = data

    def init_int(self, offset: int, size: int, value: int) -> None:
        """Set a power-on little-endian value of ``size`` bytes."""
        self.init(offset, value.to_bytes(size, "little"))

    def set_wmask(self, offset: int, mask: bytes) -> None:
        """Set which bits of each byte a write may change."""
        self._bound(offset, len(mask))
        self._wmask[offset : offset + len(mask)] = mask

    def set_wmask_int(self, offset: int, size: int, mask: int) -> None:
        self.set_wmask(offset, mask.to_bytes(size, "little"))

    def set_w1cmask(self, offset: int, mask: bytes) -> None:
        """Set which bits of each byte a written 1 clears (RW1C)."""
        self._bound(offset, len(mask))
        self._w1cmask[offset : offset + len(mask)] = mask

    def set_w1cmask_int(self, offset: int, size: int, mask: int) -> None:
        self.set_w1cmask(offset, mask.to_bytes(size, "little"))

    def wmask(self, offset: int, length: int) -> bytes:
        """The write mask of ``length`` bytes at ``offset`` (for tests and tools)."""
        self._bound(offset, length)
        return bytes(self._wmask[offset : offset + length])

    # -- run time ----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """An aligned 1/2/4-byte read; raises :class:`ConfigAccessError` otherwise."""
        check_access(offset, size, len(self._data))
        return int.from_bytes(self._data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """An aligned 1/2/4-byte write through the masks."""
        check_access(offset, size, len(self._data))
        if not 0 <= value < (1 << (8 * size)):
            raise ConfigAccessError(
                f"value {value:#x} does not fit in a {size}-byte config write",
                code=ErrorCode.INVALID_SIZE,
            )
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            pos = offset + i
            wmask = self._wmask[pos]
            new = (self._data[pos] & ~wmask) | (byte & wmask)
            self._data[pos] = new & ~(byte & self._w1cmask[pos]) & 0xFF

    def set_bits(self, offset: int, size: int, bits: int, on: bool) -> None:
        """Let the *device* set or clear read-only status bits (e.g. Status.INTERRUPT)."""
        current = int.from_bytes(self._data[offset : offset + size], "little")
        current = current | bits if on else current & ~bits
        self._data[offset : offset + size] = current.to_bytes(size, "little")

    def reset(self) -> None:
        """Restore the power-on bytes."""
        self._data[:] = self._power_on

    def image(self) -> bytes:
        return bytes(self._data)

    def _bound(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self._data):
            raise DeviceSetupError(
                f"config range {offset:#x}+{length} is outside the {len(self._data)}-byte space"
            )


def apply_header_masks(regs: RegisterFile, header_type: int) -> None:
    """Give the standard header its hardware write semantics.

    Type 0 and type 1 share Command, Status, cache line size and interrupt
    line; type 1 adds the bridge's bus numbers, windows and bridge control.
    Everything else in the header (IDs, class, revision, header type,
    capability pointer, interrupt pin, latency timer, BIST) stays read-only.
    BAR and ROM masks are set when BARs are declared.
    """
    regs.set_wmask_int(Reg.COMMAND, 2, COMMAND_WRITABLE)
    regs.set_w1cmask_int(Reg.STATUS, 2, STATUS_RW1C)
    regs.set_wmask_int(Reg.CACHE_LINE_SIZE, 1, 0xFF)
    regs.set_wmask_int(Reg.INTERRUPT_LINE, 1, 0xFF)
    if header_type & 0x7F == 2:
        _apply_cardbus_masks(regs)
        return
    if header_type & 0x7F != 1:
        return
    # Primary, secondary and subordinate bus numbers and the secondary latency timer.
    regs.set_wmask(0x18, b"\xff\xff\xff\xff")
    # I/O base/limit: the high nibble is the address, the low nibble the (RO) width.
    regs.set_wmask(0x1C, b"\xf0\xf0")
    regs.set_w1cmask_int(0x1E, 2, STATUS_RW1C)
    # Memory and prefetchable base/limit: bits 4-15 are address, bits 0-3 read-only.
    regs.set_wmask(0x20, b"\xf0\xff\xf0\xff\xf0\xff\xf0\xff")
    # Upper 32 bits of the prefetchable window and upper 16 bits of the I/O window.
    regs.set_wmask(0x28, b"\xff" * 12)
    # Bridge control: parity, SERR, ISA, VGA, VGA16, master abort, bus reset, fast b2b, timers.
    regs.set_wmask_int(0x3E, 2, 0x0FFF)


def _apply_cardbus_masks(regs: RegisterFile) -> None:
    """A CardBus bridge's header (type 2): bus numbers, windows and controls are writable."""
    regs.set_w1cmask_int(0x16, 2, STATUS_RW1C)
    # PCI, CardBus and subordinate bus numbers, CardBus latency timer.
    regs.set_wmask(0x18, b"\xff\xff\xff\xff")
    # Memory windows 0 and 1: 4 KiB granular base/limit.
    regs.set_wmask(0x1C, b"\x00\xf0\xff\xff" * 4)
    # I/O windows 0 and 1: dword-granular, bits 1:0 say the width (read-only).
    regs.set_wmask(0x2C, b"\xfc\xff\xff\xff" * 4)
    # Bridge control (parity, SERR, ISA, VGA, master abort, reset, IRQ routing, prefetch).
    regs.set_wmask_int(0x3E, 2, 0x07FF)
    # The 16-bit PC Card legacy-mode base address.
    regs.set_wmask(0x44, b"\xff\xff\xff\xff")
