"""Snapshot devices loaded from the real lspci dumps in tests/data/pcidata."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pciback.devices import (
    ROM_BAR_INDEX,
    BarKind,
    DeviceSetupError,
    MemoryRegion,
    SnapshotDevice,
    default_bar_size,
)
from shared.errors import DumpFormatError
from shared.pci import PciAddress, Reg, walk_capabilities

_HERE = Path(__file__).resolve()
DATA_DIR = _HERE.parents[2] / "data" / "pcidata"
if not DATA_DIR.is_dir():
    DATA_DIR = Path("/work/shared/pcidata")
DUMPS = sorted(p for p in DATA_DIR.glob("*.txt") if not p.name.endswith("vvv.txt"))
_HEX_LINE = re.compile(r"^([0-9a-f]{2,3}): ((?:[0-9a-f]{2} ?){16})$")
_REGION = re.compile(r"^\tRegion (\d): .*\[size=(\d+)([KMG]?)\]")
_ROM = re.compile(r"^\tExpansion ROM at .*\[size=(\d+)([KMG]?)\]")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def dump_bytes(path: Path) -> bytes:
    """The dump's config bytes, read independently of shared.pci's parser."""
    out = bytearray()
    for line in path.read_text().splitlines():
        match = _HEX_LINE.match(line)
        if match:
            assert int(match[1], 16) == len(out)
            out += bytes.fromhex(match[2])
    return bytes(out)


def live_sizes(path: Path) -> dict[int, int]:
    """BAR sizes the contributor's live lspci printed (``NAME.orig-vvv.txt``)."""
    orig = path.with_name(path.name[: -len(".txt")] + ".orig-vvv.txt")
    sizes: dict[int, int] = {}
    if not orig.exists():
        return sizes
    for line in orig.read_text().splitlines():
        if m := _REGION.match(line):
            sizes[int(m[1])] = int(m[2]) * _UNITS[m[3]]
        elif m := _ROM.match(line):
            sizes[ROM_BAR_INDEX] = int(m[1]) * _UNITS[m[2]]
    return sizes


def test_there_are_dumps() -> None:
    assert len(DUMPS) >= 20


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_config_image_equals_dump(path: Path) -> None:
    dev = SnapshotDevice.from_dump(path)
    expected = dump_bytes(path)
    assert dev.config_size == len(expected)
    assert dev.config_image() == expected
    for offset in range(0, len(expected), 4):
        assert dev.config_read(offset, 4) == int.from_bytes(expected[offset : offset + 4], "little")
    assert dev.kind == "snapshot"
    assert dev.description == path.read_text().splitlines()[0]


@pytest.mark.parametrize("path", DUMPS, ids=lambda p: p.stem)
def test_bars_size_like_hardware_and_reset(path: Path) -> None:
    dev = SnapshotDevice.from_dump(path)
    power_on = dev.config_image()
    for spec in dev.bars():
        offset = Reg.BAR0 + 4 * spec.index
        dev.config_write(offset, 4, 0xFFFF_FFFF)
        low = dev.config_read(offset, 4)
        assert low & spec.flags == spec.flags
        if spec.kind is BarKind.MEM64:
            dev.config_write(offset + 4, 4, 0xFFFF_FFFF)
            high = dev.config_read(offset + 4, 4)
            assert ((high << 32) | (low & ~0xF)) == ~(spec.size - 1) & (2**64 - 1)
        else:
            mask = 0xFFFF_FFFC if spec.kind is BarKind.IO else 0xFFFF_FFF0
            assert low & mask == ~(spec.size - 1) & mask
    dev.reset()
    assert dev.config_image() == power_on


@pytest.mark.parametrize("path", [p for p in DUMPS if live_sizes(p)], ids=lambda p: p.stem)
def test_live_bar_sizes_are_accepted(path: Path) -> None:
    sizes = live_sizes(path)
    dev = SnapshotDevice.from_dump(path, bar_sizes=sizes)
    declared = {spec.index: spec.size for spec in dev.bars()}
    if ROM_BAR_INDEX in sizes:
        declared[ROM_BAR_INDEX] = dev.rom_size()
    assert {index: declared.get(index) for index in sizes} == sizes
    assert dev.config_image() == dump_bytes(path)


def test_default_sizes_from_base_alignment() -> None:
    assert default_bar_size(0xF9EF_8000) == 0x8000
    assert default_bar_size(0xE000_0000) == 1 << 20  # capped
    assert default_bar_size(0) == 4096
    assert default_bar_size(0xE020, io=True) == 0x20
    assert default_bar_size(0xE000, io=True) == 256
    assert default_bar_size(0, io=True) == 256
    assert default_bar_size(0xFFF8_0000, rom=True) == 64 << 10
    dev = SnapshotDevice.from_dump(DATA_DIR / "audio_intel_ich10_hda.txt")
    assert [(b.index, b.size, b.kind) for b in dev.bars()] == [(0, 0x8000, BarKind.MEM64)]
    assert dev.address == PciAddress(0, 0, 0x1B, 0)


def test_explicit_sizes_and_sparse_big_bar() -> None:
    path = DATA_DIR / "gpu_nvidia_gp108m_mx150.txt"
    dev = SnapshotDevice.from_dump(path, bar_sizes={0: 16 << 20, 1: 256 << 20, 3: 32 << 20})
    sizes = {b.index: b.size for b in dev.bars()}
    assert sizes == {0: 16 << 20, 1: 256 << 20, 3: 32 << 20, 5: 0x100}
    dev.config_write(Reg.BAR1, 4, 0xFFFF_FFFF)
    assert dev.config_read(Reg.BAR1, 4) == 0xF000_000C
    assert dev.bar_read(1, (256 << 20) - 8, 8) == 0
    dev.bar_write(1, 0x0800_0000, 4, 0xCAFEF00D)
    assert dev.bar_read(1, 0x0800_0000, 4) == 0xCAFEF00D
    dev.reset()
    assert dev.bar_read(1, 0x0800_0000, 4) == 0


def test_attach_a_model_to_a_bar() -> None:
    dev = SnapshotDevice.from_dump(DATA_DIR / "usb_ehci_intel_ich10.txt")
    region = MemoryRegion(0x2000)
    region.write(0, 4, 0x0100_0020)  # CAPLENGTH/HCIVERSION
    dev.set_bar_region(0, region)
    assert dev.bar_read(0, 0, 4) == 0x0100_0020


def test_writes_change_only_the_copy_with_hardware_masks() -> None:
    path = DATA_DIR / "eth_intel_82579lm.txt"
    original = dump_bytes(path)
    dev = SnapshotDevice.from_dump(path)
    dev.config_write(Reg.VENDOR_ID, 4, 0xFFFF_FFFF)
    dev.config_write(Reg.INTERRUPT_LINE, 1, 0x42)
    dev.config_write(Reg.COMMAND, 2, 0)
    image = dev.config_image()
    assert image[:4] == original[:4]
    assert image[Reg.INTERRUPT_LINE] == 0x42
    assert image[Reg.COMMAND] & 0x07 == 0
    assert dump_bytes(path) == original  # the file is never touched
    walk = walk_capabilities(image)
    for cap in walk.standard:
        dev.config_write(cap.offset, 2, 0)  # capability headers are read-only
    assert walk_capabilities(dev.config_image()).standard == walk.standard
    body = walk.standard[0].offset + 4
    dev.config_write(body, 2, 0x1234)  # bodies are a plain copy
    assert dev.config_read(body, 2) == 0x1234


def test_extended_capability_headers_are_read_only() -> None:
    dev = SnapshotDevice.from_dump(DATA_DIR / "eth_intel_82576_sriov.txt")
    before = walk_capabilities(dev.config_image())
    assert before.extended
    for cap in before.extended:
        dev.config_write(cap.offset, 4, 0)
    assert walk_capabilities(dev.config_image()).extended == before.extended


def test_bridge_header_masks() -> None:
    dev = SnapshotDevice.from_dump(DATA_DIR / "rootport_intel_sunrisepoint_lp.txt")
    assert dev.header_type & 0x7F == 1
    dev.config_write(0x18, 4, 0x00_05_04_00)
    assert dev.config_read(0x18, 4) & 0xFFFFFF == 0x05_04_00
    dev.config_write(0x10, 4, 0xFFFF_FFFF)  # no BARs on this bridge: stays as dumped
    assert dev.config_read(0x10, 4) == int.from_bytes(dev.config_image()[0x10:0x14], "little")


def test_dump_text_and_index() -> None:
    text = "\n".join(
        (DATA_DIR / name).read_text().rstrip("\n") + "\n"
        for name in ("usb_ehci_intel_ich10.txt", "audio_intel_ich10_hda.txt")
    )
    text = text.replace("\n00:1b.0", "\n\n00:1b.0")
    second = SnapshotDevice.from_dump(text, index=1)
    assert second.config_read(Reg.DEVICE_ID, 2) == 0x3A3E
    with pytest.raises(DumpFormatError):
        SnapshotDevice.from_dump(text, index=2)
    assert SnapshotDevice.from_dump(str(DATA_DIR / "usb_ehci_intel_ich10.txt")).bars()


def test_bad_bar_sizes_rejected() -> None:
    path = DATA_DIR / "audio_intel_ich10_hda.txt"  # BAR0 64-bit at 0xf9ef8000
    with pytest.raises(DeviceSetupError, match="not aligned"):
        SnapshotDevice.from_dump(path, bar_sizes={0: 0x10000})
    with pytest.raises(DeviceSetupError, match="64-bit"):
        SnapshotDevice.from_dump(path, bar_sizes={1: 0x1000})
    with pytest.raises(DeviceSetupError, match="power of two"):
        SnapshotDevice.from_dump(path, bar_sizes={0: 0x3000})
    with pytest.raises(DeviceSetupError, match="cannot read"):
        SnapshotDevice.from_dump(DATA_DIR / "no-such-dump.txt")


def test_zero_bar_only_with_explicit_size() -> None:
    path = DATA_DIR / "audio_intel_ich10_hda.txt"  # BAR2..5 read 0
    dev = SnapshotDevice.from_dump(path, bar_sizes={2: 0x1000})
    assert [b.index for b in dev.bars()] == [0, 2]
    dev.config_write(Reg.BAR2, 4, 0xFFFF_FFFF)
    assert dev.config_read(Reg.BAR2, 4) == 0xFFFF_F000


def test_64_byte_dump() -> None:
    lines = (DATA_DIR / "usb_ehci_intel_ich10.txt").read_text().splitlines()[:5]
    dev = SnapshotDevice.from_dump("\n".join(lines) + "\n")
    assert dev.config_size == 64
    assert dev.config_image() == dump_bytes(DATA_DIR / "usb_ehci_intel_ich10.txt")[:64]
    assert [b.index for b in dev.bars()] == [0]
