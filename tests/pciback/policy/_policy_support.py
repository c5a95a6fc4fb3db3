"""Test support for the policy tests: a recording in-memory provider and a synthetic device.

``RecordingDevice`` is plain memory: a write stores bytes (no register
semantics), and every write that reaches it is recorded, so a test can assert
exactly what the policy let through to the "device".
"""

from __future__ import annotations

from pathlib import Path

from pciback.devices import BarKind, BarSpec, DeviceProvider
from shared.pci import check_access, decode_bars, decode_expansion_rom, parse_dump

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "pcidata"
if not DATA_DIR.is_dir():  # before the data was copied into the tree
    DATA_DIR = Path("/work/shared/pcidata")

DUMP_NAMES = sorted(
    p.name[: -len(".txt")] for p in DATA_DIR.glob("*.txt") if not p.name.endswith("vvv.txt")
)


def dump_bytes(name: str) -> bytes:
    return parse_dump((DATA_DIR / f"{name}.txt").read_text())[0].data


class RecordingDevice(DeviceProvider):
    """A config space in memory that records every write reaching it."""

    kind = "recording"

    def __init__(self, image: bytes, bars: list[BarSpec] | None = None, rom_size: int = 0) -> None:
        self.memory = bytearray(image)
        self.initial = bytes(image)
        self._bars = list(bars or [])
        self._rom = rom_size
        self.writes: list[tuple[int, int, int]] = []

    @property
    def config_size(self) -> int:
        return len(self.memory)

    def config_read(self, offset: int, size: int) -> int:
        check_access(offset, size, len(self.memory))
        return int.from_bytes(self.memory[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        check_access(offset, size, len(self.memory))
        self.writes.append((offset, size, value))
        self.memory[offset : offset + size] = value.to_bytes(size, "little")

    def bars(self) -> list[BarSpec]:
        return list(self._bars)

    def rom_size(self) -> int:
        return self._rom

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        raise AssertionError("the policy never touches BAR memory")

    def reset(self) -> None:
        self.memory[:] = self.initial


def bars_from_image(image: bytes) -> tuple[list[BarSpec], int]:
    """BAR specs (4 KiB memory / 32-byte I/O defaults) and ROM size for a dump's header."""
    specs: list[BarSpec] = []
    for bar in decode_bars(image):
        if bar.is_zero and not bar.is_io:
            continue
        if bar.is_64bit and bar.index == 5:
            continue  # malformed: a 64-bit BAR cannot start in the last slot
        if bar.is_io:
            specs.append(BarSpec(bar.index, 32, BarKind.IO))
        else:
            kind = BarKind.MEM64 if bar.is_64bit else BarKind.MEM32
            specs.append(BarSpec(bar.index, 4096, kind, bool(bar.flags & 0x8)))
    rom = decode_expansion_rom(image)
    return specs, (4096 if rom.raw else 0)


def dump_device(name: str) -> RecordingDevice:
    image = dump_bytes(name)
    specs, rom = bars_from_image(image)
    return RecordingDevice(image, specs, rom)


# ------------------------------------------------------------------------------------------
# A synthetic PCIe endpoint with every modelled capability.
# ------------------------------------------------------------------------------------------
SYNTH_BARS = [
    BarSpec(0, 0x1000),
    BarSpec(1, 0x20, BarKind.IO),
    BarSpec(2, 0x10_0000, BarKind.MEM64, prefetchable=True),
    BarSpec(5, 0x10),
]
SYNTH_ROM = 0x1_0000
#: Capability offsets of the synthetic device.
PM, MSI, MSIX, PCIE, VPD, VNDR = 0x40, 0x50, 0x70, 0x80, 0xC0, 0xC8
AER, DSN, SRIOV = 0x100, 0x148, 0x160


def _put(image: bytearray, offset: int, size: int, value: int) -> None:
    image[offset : offset + size] = value.to_bytes(size, "little")


def synthetic_image() -> bytes:
    img = bytearray(4096)
    _put(img, 0x00, 2, 0x8086)
    _put(img, 0x02, 2, 0x10C9)
    _put(img, 0x04, 2, 0x0146)  # MEM | MASTER | PARITY | SERR
    _put(img, 0x06, 2, 0x4810)  # CAP_LIST | SIG_TARGET_ABORT | SIG_SYSTEM_ERROR
    _put(img, 0x08, 4, 0x0200_0001)  # class 02:00:00, revision 1
    _put(img, 0x0C, 4, 0x8000_0010)  # BIST capable, latency 0, CLS 0x10
    # The "host" BAR addresses, which must never show through.
    _put(img, 0x10, 4, 0xFEB0_0000)
    _put(img, 0x14, 4, 0x0000_E001)
    _put(img, 0x18, 4, 0xC000_000C)
    _put(img, 0x1C, 4, 0x0000_0003)
    _put(img, 0x24, 4, 0xFEB1_0000)
    _put(img, 0x2C, 4, 0x0001_8086)
    _put(img, 0x30, 4, 0xFEC0_0000)
    img[0x34] = PM
    img[0x3C] = 0x0B  # the host's IRQ
    img[0x3D] = 0x01
    # PM: version 3, D0, PME status set.
    _put(img, PM, 4, 0x0003_0001 | (MSI << 8))
    _put(img, PM + 4, 2, 0x8000)
    # MSI: 64-bit, per-vector masking, 4 vectors capable, enabled by the host.
    _put(img, MSI, 2, 0x05 | (MSIX << 8))
    _put(img, MSI + 2, 2, 0x0185)
    _put(img, MSI + 4, 4, 0xFEE0_0000)
    _put(img, MSI + 0xC, 2, 0x4041)
    # MSI-X: 8 entries, table in BAR0 at 0x800, PBA at 0xC00.
    _put(img, MSIX, 2, 0x11 | (PCIE << 8))
    _put(img, MSIX + 2, 2, 0x0007)
    _put(img, MSIX + 4, 4, 0x0000_0800)
    _put(img, MSIX + 8, 4, 0x0000_0C00)
    # PCIe v2 endpoint, FLR capable.
    _put(img, PCIE, 2, 0x10 | (VPD << 8))
    _put(img, PCIE + 2, 2, 0x0002)
    _put(img, PCIE + 4, 4, 0x1000_8FC2)
    _put(img, PCIE + 8, 2, 0x2810)
    _put(img, PCIE + 0xA, 2, 0x0009)  # correctable + unsupported request detected
    _put(img, PCIE + 0xC, 4, 0x0043_6C41)
    _put(img, PCIE + 0x10, 2, 0x0040)
    _put(img, PCIE + 0x12, 2, 0x1041)
    # VPD, then a vendor-specific capability (end of the list).
    _put(img, VPD, 2, 0x03 | (VNDR << 8))
    _put(img, VNDR, 4, 0x0010_0009)
    _put(img, 0xE0, 4, 0xDEAD_BEEF)  # device-specific, outside any capability
    # Extended: AER v1 -> DSN -> SR-IOV.
    _put(img, AER, 4, 0x0001 | (1 << 16) | (DSN << 20))
    _put(img, AER + 4, 4, 0x0000_1000)  # an uncorrectable error is logged
    _put(img, DSN, 4, 0x0003 | (1 << 16) | (SRIOV << 20))
    _put(img, DSN + 4, 8, 0x0011_2233_4455_6677)
    _put(img, SRIOV, 4, 0x0010 | (1 << 16))
    _put(img, SRIOV + 0x0E, 2, 8)  # TotalVFs
    return bytes(img)


def synthetic_device() -> RecordingDevice:
    return RecordingDevice(synthetic_image(), SYNTH_BARS, SYNTH_ROM)
