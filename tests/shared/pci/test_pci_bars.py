"""BAR decoding and sizing masks, checked against lspci's decode of the real dumps."""

from __future__ import annotations

import re

import pytest
from _pci_testdata import DUMP_NAMES, dump_text, vvv_text

from shared.errors import PciError
from shared.pci import (
    BarFlag,
    BarInfo,
    BarKind,
    bar_count,
    bar_size_mask,
    decode_bars,
    decode_expansion_rom,
    expansion_rom_offset,
    parse_dump,
    rom_size_mask,
)

_REGION = re.compile(
    r"^\tRegion (?P<index>\d): (?:Memory at (?P<mem>[0-9a-f]+) \((?P<width>32-bit|64-bit|low-1M), "
    r"(?P<nonpf>non-)?prefetchable\)|I/O ports at (?P<io>[0-9a-f]+))",
    re.M,
)
_ROM = re.compile(r"^\tExpansion ROM at (?P<base>[0-9a-f]+)(?P<rest>.*)$", re.M)


def _data(name: str) -> bytes:
    (entry,) = parse_dump(dump_text(name))
    return entry.data


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_bars_match_lspci_regions(name: str) -> None:
    bars = {bar.index: bar for bar in decode_bars(_data(name))}
    regions = list(_REGION.finditer(vvv_text(name)))
    # lspci lists exactly the BARs whose registers are not all zero.
    assert {int(m["index"]) for m in regions} == {i for i, b in bars.items() if not b.is_zero}
    for match in regions:
        bar = bars[int(match["index"])]
        if match["io"] is not None:
            assert bar.kind is BarKind.IO
            assert bar.base == int(match["io"], 16)
            assert not bar.prefetchable
        else:
            expected_kind = BarKind.MEM64 if match["width"] == "64-bit" else BarKind.MEM32
            assert bar.kind is expected_kind
            assert bar.base == int(match["mem"], 16)
            assert bar.prefetchable == (match["nonpf"] is None)


def test_the_region_pattern_matches_the_data() -> None:
    regions = [m for n in DUMP_NAMES for m in _REGION.finditer(vvv_text(n))]
    assert len(regions) == 56
    assert {m["width"] for m in regions} == {"32-bit", "64-bit", None}
    assert any(m["width"] == "64-bit" and m["nonpf"] is None for m in regions)


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_expansion_rom_matches_lspci(name: str) -> None:
    data = _data(name)
    rom = decode_expansion_rom(data)
    match = _ROM.search(vvv_text(name))
    if match is None:
        assert rom.raw == 0
        return
    assert rom.base == int(match["base"], 16)
    assert rom.enabled == ("[disabled]" not in match["rest"])


def test_64_bit_pair_consumes_two_slots() -> None:
    # RTL8168: BAR0 I/O, BAR2 64-bit memory, BAR4 64-bit prefetchable memory.
    bars = decode_bars(_data("eth_realtek_rtl8168_h310"))
    assert [(b.index, b.kind, b.slots) for b in bars] == [
        (0, BarKind.IO, (0,)),
        (1, BarKind.MEM32, (1,)),
        (2, BarKind.MEM64, (2, 3)),
        (4, BarKind.MEM64, (4, 5)),
    ]
    io, _, mem, _ = bars
    assert io.is_io and io.flags == 0x1 and io.base == 0xD000
    assert mem.is_64bit and mem.offset == 0x18 and mem.flags == 0x4


def test_bridge_headers_have_two_bars() -> None:
    bars = decode_bars(_data("rootport_intel_cfl_peg_x16"))
    assert [b.slots for b in bars] == [(0,), (1,)]
    assert all(b.is_zero for b in bars)


def test_64_bit_flag_in_the_last_slot_has_no_upper_half() -> None:
    raw = bytearray(256)
    raw[0x24:0x28] = (0xFE00_000C).to_bytes(4, "little")
    last = decode_bars(bytes(raw))[-1]
    assert last == BarInfo(5, 0x24, BarKind.MEM64, True, 0xFE00_0000, 0xFE00_000C, (5,))


def test_legacy_below_1m_type_decodes_as_mem32() -> None:
    raw = bytearray(64)
    raw[0x10:0x14] = (0x000C_0002).to_bytes(4, "little")
    assert decode_bars(bytes(raw))[0].kind is BarKind.MEM32
    assert decode_bars(bytes(raw))[0].flags == 0x2


def test_decode_rejects_short_images_and_unknown_layouts() -> None:
    with pytest.raises(PciError, match="shorter than the 64-byte header"):
        decode_bars(bytes(32))
    raw = bytearray(64)
    raw[0x0E] = 0x03
    with pytest.raises(PciError, match="no defined BAR layout"):
        decode_bars(bytes(raw))


def test_bar_count_and_rom_offset() -> None:
    assert [bar_count(t) for t in (0x00, 0x80, 0x01, 0x81, 0x02)] == [6, 6, 2, 2, 1]
    assert expansion_rom_offset(0x00) == 0x30
    assert expansion_rom_offset(0x80) == 0x30
    assert expansion_rom_offset(0x01) == 0x38
    with pytest.raises(PciError, match="no expansion ROM"):
        expansion_rom_offset(0x02)
    with pytest.raises(PciError):
        bar_count(0x7F)


@pytest.mark.parametrize(
    ("size", "flags", "upper", "expected"),
    [
        (0x1000, 0, False, 0xFFFF_F000),
        (0x1000, BarFlag.PREFETCH, False, 0xFFFF_F008),
        (16, 0, False, 0xFFFF_FFF0),
        (1 << 31, 0, False, 0x8000_0000),
        (0x100, BarFlag.IO_SPACE, False, 0xFFFF_FF01),
        (4, BarFlag.IO_SPACE, False, 0xFFFF_FFFD),
        (0x4000, BarFlag.MEM_TYPE_64, False, 0xFFFF_C004),
        (0x4000, BarFlag.MEM_TYPE_64, True, 0xFFFF_FFFF),
        (1 << 34, BarFlag.MEM_TYPE_64 | BarFlag.PREFETCH, False, 0x0000_000C),
        (1 << 34, BarFlag.MEM_TYPE_64 | BarFlag.PREFETCH, True, 0xFFFF_FFFC),
        (1 << 63, BarFlag.MEM_TYPE_64, True, 0x8000_0000),
    ],
)
def test_bar_size_mask(size: int, flags: int, upper: bool, expected: int) -> None:
    assert bar_size_mask(size, flags, upper) == expected


def test_size_masks_recover_the_size() -> None:
    """What a driver does with the mask: size = ~(mask & address bits) + 1."""
    for shift in range(4, 32):
        mask = bar_size_mask(1 << shift, BarFlag.PREFETCH)
        assert (~(mask & 0xFFFF_FFF0) & 0xFFFF_FFFF) + 1 == 1 << shift
    for shift in range(4, 64):
        lo = bar_size_mask(1 << shift, BarFlag.MEM_TYPE_64)
        hi = bar_size_mask(1 << shift, BarFlag.MEM_TYPE_64, is_64_upper=True)
        both = (hi << 32) | (lo & 0xFFFF_FFF0)
        assert (~both & 0xFFFF_FFFF_FFFF_FFFF) + 1 == 1 << shift


@pytest.mark.parametrize(
    ("size", "flags", "upper", "message"),
    [
        (0x1800, 0, False, "power of two"),
        (8, 0, False, "power of two"),
        (1 << 32, 0, False, "power of two"),
        (0x200, BarFlag.IO_SPACE, False, "power of two"),
        (2, BarFlag.IO_SPACE, False, "power of two"),
        (0x100, BarFlag.IO_SPACE | BarFlag.PREFETCH, False, "only bit 0"),
        (0x100, BarFlag.IO_SPACE, True, "no upper half"),
        (0x100, 0, True, "64-bit memory BAR"),
        (0x100, 0x10, False, "outside the low four"),
        (True, 0, False, "must be an int"),
    ],
)
def test_bar_size_mask_errors(size: int, flags: int, upper: bool, message: str) -> None:
    with pytest.raises(PciError, match=message):
        bar_size_mask(size, flags, upper)


def test_rom_size_mask() -> None:
    assert rom_size_mask(0x800) == 0xFFFF_F800
    assert rom_size_mask(0x10000) == 0xFFFF_0000
    with pytest.raises(PciError, match="power of two"):
        rom_size_mask(0x400)
