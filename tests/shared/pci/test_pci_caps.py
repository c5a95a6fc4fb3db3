"""Capability walking on real dumps and on crafted malformed lists; unlinking."""

from __future__ import annotations

import itertools

import pytest
from _pci_testdata import DUMP_NAMES, dump_text, lspci_capabilities

from shared.errors import CapabilityError
from shared.pci import (
    Capability,
    CapId,
    ConfigSpace,
    ExtCapId,
    Status,
    ext_cap_header,
    find_capability,
    find_extended_capability,
    parse_dump,
    split_ext_cap_header,
    unlink_capability,
    walk_capabilities,
)

#: How lspci 3.9.0 names each capability, mapped to the IDs it may stand for.
STD_NAMES: dict[str, set[int]] = {
    "Power Management": {CapId.PM},
    "MSI:": {CapId.MSI},
    "MSI-X:": {CapId.MSIX},
    "Express": {CapId.EXP},
    "Vital Product Data": {CapId.VPD},
    "PCI-X bridge device": {CapId.PCIX},
    "Vendor Specific Information": {CapId.VNDR},
    "Debug port": {CapId.DBG},
    "Hot-plug capable": {CapId.SHPC},
    "Subsystem": {CapId.SSVID},
    "SATA HBA": {CapId.SATA},
    "PCI Advanced Features": {CapId.AF},
}
EXT_NAMES: dict[str, set[int]] = {
    "Advanced Error Reporting": {ExtCapId.ERR},
    "Virtual Channel": {ExtCapId.VC, ExtCapId.VC9},
    "Device Serial Number": {ExtCapId.DSN},
    "Power Budgeting": {ExtCapId.PWR},
    "Root Complex Link": {ExtCapId.RCLD},
    "Vendor Specific Information": {ExtCapId.VNDR},
    "Access Control Services": {ExtCapId.ACS},
    "Alternative Routing-ID": {ExtCapId.ARI},
    "Address Translation Service": {ExtCapId.ATS},
    "Single Root I/O Virtualization": {ExtCapId.SRIOV},
    "Page Request Interface": {ExtCapId.PRI},
    "Physical Resizable BAR": {ExtCapId.REBAR},
    "Latency Tolerance Reporting": {ExtCapId.LTR},
    "Secondary PCI Express": {ExtCapId.SECPCI},
    "Process Address Space ID": {ExtCapId.PASID},
    "L1 PM Substates": {ExtCapId.L1SS},
    "Data Link Feature": {ExtCapId.DLNK},
    "Physical Layer 16.0 GT/s": {ExtCapId.PL_16GT},
    "Lane Margining at the Receiver": {ExtCapId.LMR},
}


def _ids_for(text: str, table: dict[str, set[int]]) -> set[int]:
    prefixes = [prefix for prefix in table if text.startswith(prefix)]
    assert prefixes, f"no ID known for lspci's {text!r}; extend the table"
    return table[max(prefixes, key=len)]


def _space(name: str) -> ConfigSpace:
    (entry,) = parse_dump(dump_text(name))
    return entry.config_space()


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_walk_matches_lspci_decode(name: str) -> None:
    walk = walk_capabilities(_space(name))
    assert walk.ok, walk.problems
    expected = lspci_capabilities(name)
    assert expected, "every dump in the set has capabilities"
    got = list(walk)
    assert [c.offset for c in got] == [offset for offset, _, _ in expected]
    for cap, (offset, version, text) in zip(got, expected, strict=True):
        assert cap.extended == (offset >= 0x100)
        if cap.extended:
            assert cap.version == version
            assert cap.id in _ids_for(text, EXT_NAMES), (hex(offset), text)
        else:
            assert version is None
            assert cap.id in _ids_for(text, STD_NAMES), (hex(offset), text)


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_walk_chains_are_consistent(name: str) -> None:
    walk = walk_capabilities(_space(name))
    for chain in (walk.standard, walk.extended):
        for cap, following in itertools.pairwise(chain):
            assert cap.next == following.offset
        if chain:
            assert chain[-1].next == 0


def test_256_byte_dumps_have_no_extended_list() -> None:
    walk = walk_capabilities(_space("nvme_samsung_a808_power9"))
    assert walk.extended == ()
    assert [c.id for c in walk.standard] == [CapId.PM, CapId.MSI, CapId.EXP, CapId.MSIX]


def test_find_helpers() -> None:
    space = _space("eth_intel_82576_sriov")
    msix = find_capability(space, CapId.MSIX)
    assert msix == Capability(CapId.MSIX, 0x70, False, 0, 0xA0)
    sriov = find_extended_capability(bytes(space), ExtCapId.SRIOV)
    assert sriov is not None and (sriov.offset, sriov.version, sriov.next) == (0x160, 1, 0)
    assert find_capability(space, CapId.AGP) is None
    assert find_extended_capability(space, ExtCapId.REBAR) is None
    walk = walk_capabilities(space)
    assert walk.find(CapId.PM) == walk.standard[0]
    assert walk.find_all(ExtCapId.ERR, extended=True) == (walk.extended[0],)


def test_capability_names() -> None:
    assert Capability(CapId.MSI, 0x50).name == "MSI"
    assert Capability(ExtCapId.ERR, 0x100, True, 2).name == "ERR"
    assert Capability(0x77, 0x50).name == "0x77"
    assert Capability(0, 0x100, True).name == "NULL"
    assert str(Capability(ExtCapId.DSN, 0x140, True, 1)) == "[140 v1] DSN"
    assert str(Capability(CapId.PM, 0x40)) == "[40] PM"


# --- crafted images -------------------------------------------------------


def _image(size: int = 256, *, cap_list: bool = True, pointer: int = 0x40) -> bytearray:
    raw = bytearray(size)
    raw[0:4] = b"\x86\x80\x34\x12"
    if cap_list:
        raw[6] = Status.CAP_LIST
    raw[0x34] = pointer
    return raw


def _std(raw: bytearray, offset: int, cap_id: int, nxt: int) -> None:
    raw[offset] = cap_id
    raw[offset + 1] = nxt


def _ext(raw: bytearray, offset: int, cap_id: int, nxt: int, version: int = 1) -> None:
    raw[offset : offset + 4] = (cap_id | version << 16 | nxt << 20).to_bytes(4, "little")


def test_no_cap_list_bit_means_no_standard_caps() -> None:
    raw = _image(cap_list=False)
    _std(raw, 0x40, CapId.PM, 0)
    walk = walk_capabilities(raw)
    assert walk.standard == () and walk.ok


def test_cap_list_bit_with_null_pointer_is_an_empty_list() -> None:
    walk = walk_capabilities(_image(pointer=0))
    assert walk.standard == () and walk.ok


def test_self_loop_stops_and_reports() -> None:
    raw = _image()
    _std(raw, 0x40, CapId.PM, 0x40)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.standard] == [0x40]
    assert len(walk.problems) == 1
    assert "loop detected at offset 0x40" in walk.problems[0]


def test_two_cap_cycle_stops_and_reports() -> None:
    raw = _image()
    _std(raw, 0x40, CapId.PM, 0x50)
    _std(raw, 0x50, CapId.MSI, 0x40)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.standard] == [0x40, 0x50]
    assert "loop detected at offset 0x40" in walk.problems[0]
    assert "0x51" in walk.problems[0]


def test_pointer_into_header_stops() -> None:
    raw = _image()
    _std(raw, 0x40, CapId.PM, 0x10)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.standard] == [0x40]
    assert "points into the 64-byte header" in walk.problems[0]
    assert walk.standard[0].next == 0x10


def test_first_pointer_into_header_stops() -> None:
    walk = walk_capabilities(_image(pointer=0x3C))
    assert walk.standard == ()
    assert "0x3c at 0x34" in walk.problems[0]


def test_pointer_to_ff_id_is_a_broken_chain() -> None:
    raw = _image()
    _std(raw, 0x40, CapId.PM, 0xFC)
    raw[0xFC:0x100] = b"\xff\xff\xff\xff"
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.standard] == [0x40]
    assert "ID 0xff" in walk.problems[0]


def test_all_ones_image_does_not_loop() -> None:
    walk = walk_capabilities(b"\xff" * 4096)
    assert walk.standard == () and walk.extended == ()
    # The pointer 0xff is masked to 0xfc (reported), and the ID there is 0xff.
    assert any("reserved low bits" in p for p in walk.problems)
    assert any("ID 0xff" in p for p in walk.problems)


def test_misaligned_pointer_is_masked_and_reported() -> None:
    raw = _image(pointer=0x43)
    _std(raw, 0x40, CapId.PM, 0x52)
    _std(raw, 0x50, CapId.MSI, 0)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.standard] == [0x40, 0x50]
    assert walk.standard[0].next == 0x50
    assert len(walk.problems) == 2
    assert all("not dword aligned" in p for p in walk.problems)


def test_pointer_beyond_a_64_byte_image() -> None:
    raw = _image(64, pointer=0x40)
    walk = walk_capabilities(raw)
    assert walk.standard == ()
    assert "out of range of the 64-byte image" in walk.problems[0]


def test_image_shorter_than_a_header_is_reported_not_raised() -> None:
    walk = walk_capabilities(b"\x00" * 10)
    assert walk.standard == () and walk.extended == ()
    assert "less than the 64-byte header" in walk.problems[0]


def test_cardbus_pointer_lives_at_0x14() -> None:
    raw = _image(pointer=0)
    raw[0x0E] = 0x82  # CardBus, multi-function
    raw[0x14] = 0x80
    _std(raw, 0x80, CapId.PM, 0)
    assert [c.offset for c in walk_capabilities(raw).standard] == [0x80]


def test_extended_empty_headers_mean_none() -> None:
    for header in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"):
        raw = _image(4096, pointer=0)
        raw[0x100:0x104] = header
        walk = walk_capabilities(raw)
        assert walk.extended == () and walk.ok


def test_extended_self_loop() -> None:
    raw = _image(4096, pointer=0)
    _ext(raw, 0x100, ExtCapId.ERR, 0x100)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.extended] == [0x100]
    assert "loop detected at offset 0x100" in walk.problems[0]


def test_extended_cycle() -> None:
    raw = _image(4096, pointer=0)
    _ext(raw, 0x100, ExtCapId.ERR, 0x140)
    _ext(raw, 0x140, ExtCapId.DSN, 0x180)
    _ext(raw, 0x180, ExtCapId.ARI, 0x140)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.extended] == [0x100, 0x140, 0x180]
    assert "loop detected at offset 0x140" in walk.problems[0]


def test_extended_pointer_below_0x100() -> None:
    raw = _image(4096, pointer=0)
    _ext(raw, 0x100, ExtCapId.ERR, 0x80)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.extended] == [0x100]
    assert "below 0x100" in walk.problems[0]


def test_extended_misaligned_pointer_is_masked() -> None:
    raw = _image(4096, pointer=0)
    _ext(raw, 0x100, ExtCapId.ERR, 0x143)
    _ext(raw, 0x140, ExtCapId.DSN, 0)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.extended] == [0x100, 0x140]
    assert "misaligned" in walk.problems[0]


def test_extended_pointer_to_empty_header() -> None:
    raw = _image(4096, pointer=0)
    _ext(raw, 0x100, ExtCapId.ERR, 0x200)
    walk = walk_capabilities(raw)
    assert [c.offset for c in walk.extended] == [0x100]
    assert "empty header" in walk.problems[0]


def test_null_extended_capability_is_listed_like_lspci_does() -> None:
    raw = _image(4096, pointer=0)
    _ext(raw, 0x100, 0, 0x140, version=0)
    _ext(raw, 0x140, ExtCapId.DSN, 0)
    walk = walk_capabilities(raw)
    assert [(c.id, c.offset) for c in walk.extended] == [(0, 0x100), (ExtCapId.DSN, 0x140)]
    assert walk.ok


def test_ext_header_pack_and_unpack() -> None:
    header = ext_cap_header(ExtCapId.ERR, 2, 0x148)
    assert header == 0x1482_0001
    assert split_ext_cap_header(header) == (1, 2, 0x148)
    for bad in ((0x10000, 1, 0), (1, 16, 0), (1, 1, 0x1000), (1, 1, 0x142)):
        with pytest.raises(CapabilityError):
            ext_cap_header(*bad)


# --- unlinking ------------------------------------------------------------


def _expected_after_unlink(chain: tuple[Capability, ...], index: int) -> list[tuple[int, int]]:
    return [(c.id, c.offset) for i, c in enumerate(chain) if i != index]


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_unlink_removes_exactly_one_standard_capability(name: str) -> None:
    original = _space(name)
    walk = walk_capabilities(original)
    for index, cap in enumerate(walk.standard):
        space = original.copy()
        unlink_capability(space, cap)
        after = walk_capabilities(space)
        assert after.ok
        assert [(c.id, c.offset) for c in after.standard] == _expected_after_unlink(
            walk.standard, index
        )
        assert after.extended == walk.extended
        changed = [
            i for i, (a, b) in enumerate(zip(bytes(space), bytes(original), strict=True)) if a != b
        ]
        anchor = 0x34 if index == 0 else walk.standard[index - 1].offset + 1
        status_changed = [6] if index == 0 and cap.next == 0 else []
        assert set(changed) <= {anchor, *status_changed}
    assert bytes(original) == bytes(_space(name)), "the original must not change"


@pytest.mark.parametrize(
    "name", sorted(n for n in DUMP_NAMES if walk_capabilities(_space(n)).extended)
)
def test_unlink_removes_exactly_one_extended_capability(name: str) -> None:
    original = _space(name)
    walk = walk_capabilities(original)
    for index, cap in enumerate(walk.extended):
        space = original.copy()
        unlink_capability(space, cap)
        after = walk_capabilities(space)
        assert after.ok
        assert after.standard == walk.standard
        remaining = _expected_after_unlink(walk.extended, index)
        got = [(c.id, c.offset) for c in after.extended]
        if index == 0 and cap.next:
            # The anchor at 0x100 becomes a Null capability that skips the removed one.
            assert got[0] == (0, 0x100)
            assert after.extended[0].next == cap.next
            got = got[1:]
        assert got == remaining
        before_count = len(walk.find_all(cap.id, extended=True))
        assert len(after.find_all(cap.id, extended=True)) == before_count - 1


def test_unlink_the_only_standard_capability_clears_cap_list() -> None:
    raw = _image()
    _std(raw, 0x40, CapId.PM, 0)
    space = ConfigSpace(raw)
    unlink_capability(space, walk_capabilities(space).standard[0])
    assert space.read(0x34, 1) == 0
    assert not space.read(6, 2) & Status.CAP_LIST
    assert walk_capabilities(space).standard == ()


def test_unlink_the_only_extended_capability_empties_the_list() -> None:
    raw = _image(4096, pointer=0)
    _ext(raw, 0x100, ExtCapId.ERR, 0)
    space = ConfigSpace(raw)
    unlink_capability(space, walk_capabilities(space).extended[0])
    assert space.read(0x100, 4) == 0
    assert walk_capabilities(space).extended == ()


def test_unlink_twice_and_unknown_caps_raise() -> None:
    space = _space("eth_intel_82576_sriov")
    msi = walk_capabilities(space).find(CapId.MSI)
    assert msi is not None
    unlink_capability(space, msi)
    with pytest.raises(CapabilityError, match="not in the standard list"):
        unlink_capability(space, msi)
    with pytest.raises(CapabilityError, match="not in the extended list"):
        unlink_capability(space, Capability(ExtCapId.ERR, 0x200, True, 1, 0))


def test_unlink_cannot_remove_the_null_anchor() -> None:
    space = _space("eth_intel_82576_sriov")
    unlink_capability(space, walk_capabilities(space).extended[0])
    null = walk_capabilities(space).extended[0]
    assert (null.id, null.version) == (0, 0)
    with pytest.raises(CapabilityError, match="anchors"):
        unlink_capability(space, null)


def test_unlink_every_capability_leaves_empty_lists() -> None:
    space = _space("rootport_intel_haswell_e_aer")
    while walk_capabilities(space).standard:
        unlink_capability(space, walk_capabilities(space).standard[-1])
    while True:
        ext = [c for c in walk_capabilities(space).extended if c.id or c.version]
        if not ext:
            break
        unlink_capability(space, ext[0])
    walk = walk_capabilities(space)
    assert walk.ok and walk.standard == ()
    assert [c.id for c in walk.extended] in ([], [0])
    assert not space.read(6, 2) & Status.CAP_LIST


def test_unlinking_the_last_entry_of_a_looped_chain_ends_the_list_cleanly() -> None:
    raw = _image(4096)
    _std(raw, 0x40, CapId.PM, 0x50)
    _std(raw, 0x50, CapId.MSI, 0x40)  # loops back
    _ext(raw, 0x100, ExtCapId.ERR, 0x140)
    _ext(raw, 0x140, ExtCapId.DSN, 0x080)  # points below 0x100
    space = ConfigSpace(raw)
    walk = walk_capabilities(space)
    assert len(walk.problems) == 2
    unlink_capability(space, walk.standard[-1])
    unlink_capability(space, walk.extended[-1])
    after = walk_capabilities(space)
    assert after.ok
    assert [c.offset for c in after.standard] == [0x40]
    assert [c.offset for c in after.extended] == [0x100]
    assert after.standard[0].next == 0 and after.extended[0].next == 0
