"""Snapshot devices: someone else's hardware, reproduced from an ``lspci -x`` dump.

A snapshot is a *copy*. Config reads return the dump's bytes; config writes
change the private copy (never anything real) with hardware-like semantics
where the header defines them:

- the standard header follows the same masks as an emulated device: IDs,
  class, revision, header type, capability pointer, interrupt pin read-only;
  Command's decode/master/parity/SERR/INTx-disable bits writable; Status error
  bits RW1C; cache line size and interrupt line read/write; a type 1 bridge's
  bus numbers, windows and bridge control read/write;
- BARs and the expansion ROM size like hardware (write all ones, read back the
  size mask with the flag bits); implemented BARs keep the dump's base address;
- capability headers (ID and next pointer, extended headers) are read-only so
  the list cannot be broken; the rest of the config space beyond the header
  is plain read/write memory, because a dump does not say which
  device-specific bits are read-only. The guest-facing policy decides what a
  guest may actually write.

BAR sizes come from ``bar_sizes`` (index 0-5, and 6 for the expansion ROM, as
in sysfs ``resource``). Without one, a BAR's size is derived from its base
address: hardware aligns a BAR to its size, so the lowest set address bit is
an upper bound on the size. The default is that bound, capped at 1 MiB for
memory BARs, 256 bytes for I/O BARs and 64 KiB for the ROM; an unassigned base
(address 0) gets 4 KiB (memory) or 256 bytes (I/O). A 32-bit memory BAR that
reads 0 cannot be told from an unimplemented one, so it is implemented only
when ``bar_sizes`` names it; a ROM register that reads 0 likewise.

At assignment, firmware (``pciback.plane.firmware``) places the BARs sized by
``bar_sizes`` in the guest's windows and keeps the dump's programmed address
for the others (:meth:`SnapshotDevice.firmware_addresses`).

A CardBus bridge (header type 2, also from a 128-byte ``lspci -x`` dump) has
one BAR and no expansion ROM; its header runs to 0x48.

BAR contents are zero-filled memory allocated page by page on first write (a
256 MiB GPU BAR costs nothing until written), unless a model is attached with
:meth:`SnapshotDevice.set_bar_region`.
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import DumpFormatError
from shared.pci import (
    EXT_CAP_START,
    BarInfo,
    PciAddress,
    Reg,
    decode_bars,
    decode_expansion_rom,
    parse_dump,
    walk_capabilities,
)

from ._base import BarKind, DeviceSetupError
from ._emulated import EmulatedDevice

__all__ = ["SnapshotDevice", "default_bar_size", "ROM_BAR_INDEX"]

#: The key of ``bar_sizes`` that sizes the expansion ROM (sysfs ``resource`` line 6).
ROM_BAR_INDEX = 6

_MEM_DEFAULT_CAP = 1 << 20
_MEM_UNASSIGNED = 4096
_IO_DEFAULT_CAP = 256
_ROM_DEFAULT_CAP = 64 << 10
_HEADER_END = 0x40
_CARDBUS_HEADER_END = 0x48


def default_bar_size(base: int, *, io: bool = False, rom: bool = False) -> int:
    """The size a snapshot gives a BAR whose size the user did not state (see module doc)."""
    cap = _IO_DEFAULT_CAP if io else _ROM_DEFAULT_CAP if rom else _MEM_DEFAULT_CAP
    if base == 0:
        return _IO_DEFAULT_CAP if io else 2048 if rom else _MEM_UNASSIGNED
    return min(base & -base, cap)


class SnapshotDevice(EmulatedDevice):
    """A device whose config space is a copy of a dump (see the module doc for semantics)."""

    kind = "snapshot"

    def __init__(
        self,
        image: bytes,
        *,
        bar_sizes: dict[int, int] | None = None,
        address: PciAddress | None = None,
        description: str = "",
    ) -> None:
        if len(image) not in (64, 256, 4096):
            raise DeviceSetupError(f"a config image has 64, 256 or 4096 bytes, not {len(image)}")
        raw = bytes(image)

        def field(offset: int, size: int) -> int:
            return int.from_bytes(raw[offset : offset + size], "little")

        super().__init__(
            vendor_id=field(Reg.VENDOR_ID, 2),
            device_id=field(Reg.DEVICE_ID, 2),
            class_code=field(Reg.REVISION_ID, 4) >> 8,
            revision=raw[Reg.REVISION_ID],
            interrupt_pin=min(raw[Reg.INTERRUPT_PIN], 4),
            header_type=raw[Reg.HEADER_TYPE] & 0x81,
        )
        self._load_image(raw)
        #: The address the dump recorded for the device (its lspci slot), if known.
        self.address = address
        #: The dump's header line (``00:1b.0 Audio device: ...``), if known.
        self.description = description
        self._open_device_specific_space(raw)
        self._fixed: dict[int, int] = {}
        self._declare_bars(raw, dict(bar_sizes or {}))

    @classmethod
    def from_dump(
        cls,
        text_or_path: str | Path,
        *,
        bar_sizes: dict[int, int] | None = None,
        index: int = 0,
    ) -> SnapshotDevice:
        """Load device ``index`` of an ``lspci -x``/``-xxx``/``-xxxx`` dump.

        ``text_or_path`` is a :class:`~pathlib.Path`, or a string: dump text
        when it contains a newline, otherwise a file name.
        """
        if isinstance(text_or_path, Path) or "\n" not in text_or_path:
            path = Path(text_or_path)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DeviceSetupError(f"cannot read the dump file {path}: {exc}") from exc
        else:
            text = text_or_path
        entries = parse_dump(text)
        if not 0 <= index < len(entries):
            raise DumpFormatError(
                f"the dump holds {len(entries)} device(s); device index {index} does not exist"
            )
        entry = entries[index]
        return cls(
            # A CardBus bridge's 128-byte ``lspci -x`` dump is padded to a 256-byte space.
            bytes(entry.config_space()) if len(entry.data) == 128 else entry.data,
            bar_sizes=bar_sizes,
            address=entry.address,
            description=entry.header,
        )

    def firmware_addresses(self) -> dict[int, int]:
        """The dump's own addresses of the BARs (and ROM) ``bar_sizes`` did not size.

        Their size is only derived from the address's alignment, so the
        address is the one thing known for sure: firmware keeps it. BARs with
        a size from ``bar_sizes`` are placed in the guest's windows instead.
        """
        return dict(self._fixed)

    # -- building --------------------------------------------------------------------------

    def _open_device_specific_space(self, raw: bytes) -> None:
        # A CardBus bridge's header runs on to 0x48 (subsystem IDs, legacy-mode base).
        header_end = _CARDBUS_HEADER_END if raw[Reg.HEADER_TYPE] & 0x7F == 2 else _HEADER_END
        if len(raw) <= header_end:
            return
        mask = bytearray(b"\xff" * (len(raw) - _HEADER_END))
        mask[: header_end - _HEADER_END] = bytes(header_end - _HEADER_END)
        walk = walk_capabilities(raw)
        for cap in walk:
            length = 4 if cap.extended else 2
            start = cap.offset - _HEADER_END
            mask[start : start + length] = bytes(length)
        if len(raw) > EXT_CAP_START:
            # The list anchor at 0x100 is a header even when it reads "no capability".
            start = EXT_CAP_START - _HEADER_END
            mask[start : start + 4] = bytes(4)
        self._set_masks(_HEADER_END, bytes(mask))

    def _declare_bars(self, raw: bytes, sizes: dict[int, int]) -> None:
        bars = decode_bars(raw)
        slots = {slot: bar for bar in bars for slot in bar.slots}
        for key in sizes:
            if key == ROM_BAR_INDEX:
                continue
            bar = slots.get(key)
            if bar is None or bar.index != key:
                raise DeviceSetupError(
                    f"bar_sizes names BAR{key}, but the dump's BARs are "
                    f"{', '.join(f'BAR{b.index}' for b in bars) or 'none'} "
                    f"(the upper half of a 64-bit BAR has no size of its own)"
                )
        for bar in bars:
            size = sizes.get(bar.index)
            if size is None:
                if bar.is_zero or (bar.kind is BarKind.MEM64 and len(bar.slots) == 1):
                    # Unknown (reads 0) or malformed (64-bit in the last slot): keep the
                    # register as the dump has it, read-only, with no BAR behind it.
                    continue
                size = default_bar_size(bar.base, io=bar.is_io)
                if bar.base:
                    # No size given: the dump's programmed address stays (firmware keeps it).
                    self._fixed[bar.index] = bar.base
            self._check_alignment(f"BAR{bar.index}", bar.base, size)
            self.add_bar(bar.index, size, _kind(bar), bar.prefetchable)
        if raw[Reg.HEADER_TYPE] & 0x7F == 2:
            if ROM_BAR_INDEX in sizes:
                raise DeviceSetupError(
                    "bar_sizes names the expansion ROM (6), but a CardBus bridge has none"
                )
            return
        rom = decode_expansion_rom(raw)
        rom_size = sizes.get(ROM_BAR_INDEX)
        if rom_size is None and rom.raw != 0:
            rom_size = default_bar_size(rom.base, rom=True)
            if rom.base:
                self._fixed[ROM_BAR_INDEX] = rom.base
        if rom_size is not None:
            self._check_alignment("the expansion ROM", rom.base, rom_size)
            self.add_rom(rom_size)

    @staticmethod
    def _check_alignment(what: str, base: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise DeviceSetupError(f"{what}: size {size!r} must be a power of two")
        if base & (size - 1):
            raise DeviceSetupError(
                f"{what}: the dump's base address {base:#x} is not aligned to the size "
                f"{size:#x}; hardware aligns BARs to their size, so check bar_sizes"
            )


def _kind(bar: BarInfo) -> BarKind:
    return bar.kind
