"""The policy on every real dump: transparent-readonly images and capability filtering."""

from __future__ import annotations

import pytest
from _policy_support import DATA_DIR, DUMP_NAMES, dump_bytes, dump_device
from hypothesis import given, settings
from hypothesis import strategies as st

from pciback.devices import BarKind, SnapshotDevice
from pciback.policy import (
    INTERRUPT_LINE_INIT,
    PolicedDevice,
    PolicyConfig,
    Preset,
    ext_cap_name,
    std_cap_name,
)
from shared.pci import walk_capabilities

READONLY = PolicyConfig(preset=Preset.TRANSPARENT_READONLY)

#: The virtual fields of each header layout, exactly: BARs, expansion ROM, interrupt line.
VIRTUAL_OFFSETS = {
    0: frozenset([*range(0x10, 0x28), *range(0x30, 0x34), 0x3C]),
    1: frozenset([*range(0x10, 0x18), *range(0x38, 0x3C), 0x3C]),
}


def test_there_are_dumps() -> None:
    assert len(DUMP_NAMES) >= 26, DATA_DIR


def _expected_virtual(dev: SnapshotDevice, layout: int) -> dict[int, int]:
    """The bytes the guest must see at the virtual offsets: flags only, ROM 0, line 0xff."""
    expected = dict.fromkeys(VIRTUAL_OFFSETS[layout], 0)
    for spec in dev.bars():
        expected[0x10 + 4 * spec.index] = spec.flags
        if spec.kind is BarKind.MEM64:
            assert 0x14 + 4 * spec.index in expected
    expected[0x3C] = INTERRUPT_LINE_INIT
    return expected


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_transparent_readonly_image_is_the_dump_except_virtual_fields(name: str) -> None:
    raw = dump_bytes(name)
    provider = SnapshotDevice.from_dump(DATA_DIR / f"{name}.txt")
    assert provider.config_image() == raw
    dev = PolicedDevice(provider, READONLY, guest="g", device=name)
    image = dev.guest_config_image()
    layout = raw[0x0E] & 0x7F
    virtual = VIRTUAL_OFFSETS[layout]
    assert len(image) == len(raw)
    differing = [hex(i) for i in range(len(raw)) if i not in virtual and image[i] != raw[i]]
    assert differing == []
    for offset, value in _expected_virtual(provider, layout).items():
        assert image[offset] == value, f"{name}: offset {offset:#x}"


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_default_policy_keeps_every_capability_visible(name: str) -> None:
    raw = dump_bytes(name)
    dev = PolicedDevice(dump_device(name), guest="g", device=name)
    guest = walk_capabilities(dev.guest_config_image())
    host = walk_capabilities(raw)
    assert guest == host


def _visible_after_hiding(raw: bytes, hide: set[str]) -> tuple[list[int], list[int]]:
    """Offsets of the standard and extended capabilities the guest should still see."""
    host = walk_capabilities(raw)
    std = [c.offset for c in host.standard if std_cap_name(c.id) not in hide]
    ext = [c.offset for c in host.extended if ext_cap_name(c.id) not in hide]
    return std, ext


def _guest_offsets(image: bytes) -> tuple[list[int], list[int]]:
    walk = walk_capabilities(image)
    assert walk.ok, walk.problems
    # A hidden first extended capability leaves a Null capability (ID 0) at 0x100.
    ext = [c.offset for c in walk.extended if not (c.id == 0 and c.offset == 0x100)]
    return [c.offset for c in walk.standard], ext


def test_hide_msix_on_82576() -> None:
    name = "eth_intel_82576_sriov"
    raw = dump_bytes(name)
    host = walk_capabilities(raw)
    msix = host.find(0x11)
    assert msix is not None
    dev = PolicedDevice(dump_device(name), PolicyConfig(hide=("msix",)), guest="g", device=name)
    image = dev.guest_config_image()
    guest = walk_capabilities(image)
    assert [c.id for c in guest.standard] == [c.id for c in host.standard if c.id != 0x11]
    assert [c.offset for c in guest.standard] == [c.offset for c in host.standard if c.id != 0x11]
    assert guest.extended == host.extended
    assert image[msix.offset : msix.offset + 12] == bytes(12)
    assert dev.msix_state() is None


@pytest.mark.parametrize("name", ["eth_intel_82576_sriov", "rootport_intel_haswell_e_aer"])
def test_hide_aer(name: str) -> None:
    raw = dump_bytes(name)
    host = walk_capabilities(raw)
    aer = host.find(0x01, extended=True)
    assert aer is not None
    dev = PolicedDevice(dump_device(name), PolicyConfig(hide=("aer",)), guest="g", device=name)
    image = dev.guest_config_image()
    guest = walk_capabilities(image)
    assert guest.standard == host.standard
    expected = [(c.id, c.offset) for c in host.extended if c.id != 0x01]
    seen = [(c.id, c.offset) for c in guest.extended]
    if aer.offset == 0x100:
        assert seen[0] == (0, 0x100)  # the Null capability anchoring the list
        seen = seen[1:]
    assert seen == expected
    assert guest.find(0x01, extended=True) is None
    # The AER registers themselves read as zero.
    assert image[aer.offset + 4 : aer.offset + 0x2C] == bytes(0x28)


def test_hide_every_extended_capability_empties_the_list() -> None:
    name = "eth_intel_82576_sriov"
    host = walk_capabilities(dump_bytes(name))
    hide = tuple(ext_cap_name(c.id) for c in host.extended)
    dev = PolicedDevice(dump_device(name), PolicyConfig(hide=hide), guest="g", device=name)
    guest = walk_capabilities(dev.guest_config_image())
    assert guest.extended == ()


def test_hide_every_standard_capability_clears_the_cap_list_bit() -> None:
    name = "eth_intel_e100_pci_intx"
    host = walk_capabilities(dump_bytes(name))
    hide = tuple(std_cap_name(c.id) for c in host.standard)
    dev = PolicedDevice(dump_device(name), PolicyConfig(hide=hide), guest="g", device=name)
    image = dev.guest_config_image()
    assert walk_capabilities(image).standard == ()
    assert image[0x06] & 0x10 == 0
    assert image[0x34] == 0


_DUMP_CAPS = {
    name: sorted(
        {std_cap_name(c.id) for c in walk_capabilities(dump_bytes(name)).standard}
        | {ext_cap_name(c.id) for c in walk_capabilities(dump_bytes(name)).extended}
    )
    for name in DUMP_NAMES
}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hiding_any_subset_on_any_dump_hides_exactly_that_subset(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(DUMP_NAMES))
    kinds = _DUMP_CAPS[name]
    hide = set(data.draw(st.lists(st.sampled_from(kinds), unique=True))) if kinds else set()
    hide.discard("null")
    raw = dump_bytes(name)
    dev = PolicedDevice(
        dump_device(name), PolicyConfig(hide=tuple(sorted(hide))), guest="g", device=name
    )
    assert _guest_offsets(dev.guest_config_image()) == _visible_after_hiding(raw, hide)
