"""CapabilityBuilder: laying out capability lists for emulated devices."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import CapabilityError
from shared.pci import (
    CapabilityBuilder,
    CapId,
    ConfigSpace,
    DumpEntry,
    ExtCapId,
    MsiControl,
    PciAddress,
    Status,
    format_dump,
    unlink_capability,
    walk_capabilities,
)

LSPCI = shutil.which("lspci")


def _fresh(size: int = 4096) -> ConfigSpace:
    space = ConfigSpace(size)
    space.write(0, 4, 0x11E8_1234)
    return space


def test_builder_lays_out_and_links_both_lists() -> None:
    space = _fresh()
    builder = CapabilityBuilder(space)
    assert builder.add(CapId.PM, b"\x03\x00\x08\x00\x00\x00") == 0x40
    assert builder.add(CapId.MSI, length=14) == 0x48  # 0x40 + 8 (6 + 2 header) aligned
    assert builder.add(CapId.EXP, bytes(0x3A)) == 0x58  # 0x48 + 14 -> 0x56 -> 0x58
    assert builder.add_extended(ExtCapId.ERR, bytes(0x44), version=2) == 0x100
    assert builder.add_extended(ExtCapId.DSN, bytes(8)) == 0x148
    walk = walk_capabilities(space)
    assert walk.ok
    assert [(c.id, c.offset, c.next) for c in walk.standard] == [
        (CapId.PM, 0x40, 0x48),
        (CapId.MSI, 0x48, 0x58),
        (CapId.EXP, 0x58, 0),
    ]
    assert [(c.id, c.offset, c.version, c.next) for c in walk.extended] == [
        (ExtCapId.ERR, 0x100, 2, 0x148),
        (ExtCapId.DSN, 0x148, 1, 0),
    ]
    assert space.read(0x34, 1) == 0x40
    assert space.read(6, 2) & Status.CAP_LIST
    assert space.read_bytes(0x42, 6) == b"\x03\x00\x08\x00\x00\x00"
    assert [c.offset for c in builder.capabilities] == [0x40, 0x48, 0x58, 0x100, 0x148]
    assert builder.space is space


def test_explicit_offsets_are_honoured() -> None:
    space = _fresh()
    builder = CapabilityBuilder(space)
    assert builder.add(CapId.PM, bytes(6), offset=0x60) == 0x60
    assert builder.add(CapId.MSI, bytes(8)) == 0x68
    assert builder.add(CapId.VNDR, bytes(2), offset=0xF0) == 0xF0
    assert builder.add_extended(ExtCapId.ERR, bytes(4)) == 0x100
    assert builder.add_extended(ExtCapId.VNDR, bytes(4), offset=0x400) == 0x400
    walk = walk_capabilities(space)
    assert [c.offset for c in walk] == [0x60, 0x68, 0xF0, 0x100, 0x400]
    assert walk.ok


def test_builder_uses_the_cardbus_pointer_for_header_type_2() -> None:
    space = _fresh(256)
    space.write(0x0E, 1, 2)
    CapabilityBuilder(space).add(CapId.PM, bytes(6))
    assert space.read(0x14, 1) == 0x40
    assert space.read(0x34, 1) == 0
    assert [c.offset for c in walk_capabilities(space).standard] == [0x40]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.add(0xFF), "0xff"),
        (lambda b: b.add(-1), "invalid"),
        (lambda b: b.add(CapId.PM, bytes(0xC0)), "does not fit"),
        (lambda b: b.add(CapId.PM, offset=0x42), "not dword aligned"),
        (lambda b: b.add(CapId.PM, offset=0x3C), "overlaps"),
        (lambda b: b.add(CapId.PM, bytes(8), length=4), "smaller than"),
        (lambda b: b.add_extended(ExtCapId.ERR, offset=0x140), "must be at 0x100"),
        (lambda b: b.add_extended(ExtCapId.ERR, bytes(0xF00)), "does not fit"),
        (lambda b: b.add_extended(0x10000), "16 bits"),
        (lambda b: b.add_extended(ExtCapId.ERR, version=16), "4 bits"),
    ],
)
def test_builder_errors(call: object, message: str) -> None:
    builder = CapabilityBuilder(_fresh())
    with pytest.raises(CapabilityError, match=message):
        call(builder)  # type: ignore[operator]


def test_extended_capabilities_need_a_4096_byte_space() -> None:
    with pytest.raises(CapabilityError, match="4096-byte"):
        CapabilityBuilder(_fresh(256)).add_extended(ExtCapId.ERR)


def test_overlap_with_the_previous_capability_is_rejected() -> None:
    builder = CapabilityBuilder(_fresh())
    builder.add(CapId.PM, bytes(6))
    with pytest.raises(CapabilityError, match="next free offset is 0x48"):
        builder.add(CapId.MSI, offset=0x44)
    builder.add_extended(ExtCapId.ERR, bytes(12))
    with pytest.raises(CapabilityError, match="next free offset is 0x110"):
        builder.add_extended(ExtCapId.DSN, offset=0x10C)


_STD_CAP = st.tuples(st.integers(0, 0xFE), st.integers(0, 12).map(lambda n: bytes(range(n))))
_EXT_CAP = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 15), st.integers(0, 40).map(bytes))


@settings(derandomize=True, max_examples=150, deadline=None)
@given(std=st.lists(_STD_CAP, max_size=12), ext=st.lists(_EXT_CAP, max_size=20))
def test_built_lists_walk_back_exactly(
    std: list[tuple[int, bytes]], ext: list[tuple[int, int, bytes]]
) -> None:
    space = _fresh()
    builder = CapabilityBuilder(space)
    std_offsets = [builder.add(cap_id, body) for cap_id, body in std]
    ext_offsets = [builder.add_extended(i, body, version=v) for i, v, body in ext]
    walk = walk_capabilities(space)
    # A Null (id 0, version 0) capability with no body written first at 0x100 with no
    # successor is indistinguishable from "no extended list": the spec's own encoding.
    if ext and ext[0][:2] == (0, 0) and len(ext) == 1:
        assert walk.extended == ()
    else:
        assert [(c.id, c.offset, c.version) for c in walk.extended] == [
            (i, off, v) for (i, v, _), off in zip(ext, ext_offsets, strict=True)
        ]
    assert [(c.id, c.offset) for c in walk.standard] == [
        (cap_id, off) for (cap_id, _), off in zip(std, std_offsets, strict=True)
    ]
    assert walk.ok
    for (_, body), off in zip(std, std_offsets, strict=True):
        assert space.read_bytes(off + 2, len(body)) == body
        assert off % 4 == 0


@settings(derandomize=True, max_examples=150, deadline=None)
@given(
    count=st.integers(1, 10),
    ext_count=st.integers(1, 10),
    data=st.data(),
)
def test_unlinking_any_subset_removes_exactly_those(
    count: int, ext_count: int, data: st.DataObject
) -> None:
    space = _fresh()
    builder = CapabilityBuilder(space)
    for i in range(count):
        builder.add(0x09, bytes([i]))  # vendor-specific, numbered through the body
    for i in range(ext_count):
        builder.add_extended(ExtCapId.VNDR, bytes([i]))
    before = walk_capabilities(space)
    std_hidden = data.draw(st.sets(st.sampled_from(before.standard)))
    ext_hidden = data.draw(st.sets(st.sampled_from(before.extended)))
    order = data.draw(st.permutations([*std_hidden, *ext_hidden]))
    for cap in order:
        unlink_capability(space, cap)
    after = walk_capabilities(space)
    assert after.ok
    assert [c.offset for c in after.standard] == [
        c.offset for c in before.standard if c not in std_hidden
    ]
    real_ext = [c.offset for c in after.extended if (c.id, c.version) != (0, 0)]
    assert real_ext == [c.offset for c in before.extended if c not in ext_hidden]
    nulls = [c for c in after.extended if (c.id, c.version) == (0, 0)]
    assert len(nulls) <= 1
    assert all(c.offset == 0x100 for c in nulls)
    assert bool(space.read(6, 2) & Status.CAP_LIST) == bool(after.standard)


@pytest.mark.lspci
@pytest.mark.skipif(LSPCI is None, reason="needs the real lspci (pciutils)")
def test_real_lspci_decodes_a_built_device(tmp_path: Path) -> None:
    assert LSPCI is not None
    space = _fresh()
    space.write(0x08, 4, 0x00FF_0010)
    builder = CapabilityBuilder(space)
    builder.add(CapId.PM, b"\x03\x00\x08\x00\x00\x00")
    builder.add(CapId.MSI, (MsiControl.ADDR_64).to_bytes(2, "little"), length=14)
    # lspci decodes extended capabilities only on PCI Express functions.
    builder.add(CapId.EXP, (0x0002).to_bytes(2, "little"), length=0x3C)
    builder.add_extended(ExtCapId.ERR, bytes(0x44), version=2)
    builder.add_extended(ExtCapId.DSN, bytes(8))
    path = tmp_path / "built.txt"
    entry = DumpEntry.for_device(PciAddress(0, 0, 3, 0), "Unclassified device", bytes(space))
    path.write_text(format_dump([entry]))
    out = subprocess.run(
        [LSPCI, "-F", str(path), "-vvv"], check=True, capture_output=True, text=True
    ).stdout
    caps = [line.strip() for line in out.splitlines() if line.startswith("\tCapabilities:")]
    assert caps[0].startswith("Capabilities: [40] Power Management version 3")
    assert caps[1].startswith("Capabilities: [48] MSI: Enable- Count=1/1 Maskable- 64bit+")
    assert caps[2].startswith("Capabilities: [58] Express (v2) Endpoint")
    assert caps[3].startswith("Capabilities: [100 v2] Advanced Error Reporting")
    assert caps[4].startswith("Capabilities: [148 v1] Device Serial Number")
    assert len(caps) == 5
