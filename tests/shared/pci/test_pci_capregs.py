"""Capability-body constants, checked against lspci's decode of the real dumps."""

from __future__ import annotations

import re

import pytest
from _pci_testdata import DUMP_NAMES, dump_text, vvv_text

from shared.pci import (
    CapId,
    MsiControl,
    MsiReg,
    MsixControl,
    MsixReg,
    PcieFlags,
    PciePortType,
    PcieReg,
    PmCtrl,
    PmReg,
    msi_layout,
    msi_vectors_capable,
    msi_vectors_enabled,
    msix_table_size,
    parse_dump,
    split_bir,
    walk_capabilities,
)

_MSI = re.compile(
    r"^\tCapabilities: \[(?P<off>[0-9a-f]+)\] MSI: Enable(?P<en>[+-]) Count=(?P<enabled>\d+)/"
    r"(?P<capable>\d+) Maskable(?P<mask>[+-]) 64bit(?P<b64>[+-])\n\t\tAddress: (?P<addr>[0-9a-f]+)"
    r"  Data: (?P<data>[0-9a-f]+)",
    re.M,
)
_MSIX = re.compile(
    r"^\tCapabilities: \[(?P<off>[0-9a-f]+)\] MSI-X: Enable(?P<en>[+-]) Count=(?P<count>\d+) "
    r"Masked(?P<masked>[+-])\n\t\tVector table: BAR=(?P<tbir>\d) offset=(?P<toff>[0-9a-f]+)\n"
    r"\t\tPBA: BAR=(?P<pbir>\d) offset=(?P<poff>[0-9a-f]+)",
    re.M,
)
_PM_STATUS = re.compile(
    r"^\tCapabilities: \[(?P<off>[0-9a-f]+)\] Power Management version \d\n.*\n"
    r"\t\tStatus: D(?P<state>\d) NoSoftRst(?P<nsr>[+-]) PME-Enable(?P<pme_en>[+-])",
    re.M,
)
_EXPRESS = re.compile(
    r"^\tCapabilities: \[(?P<off>[0-9a-f]+)\] Express \(v(?P<ver>\d)\) (?P<kind>[^,(]+)", re.M
)
_PORT_TYPES = {
    "Endpoint": PciePortType.ENDPOINT,
    "Legacy Endpoint": PciePortType.LEGACY_ENDPOINT,
    "Root Port": PciePortType.ROOT_PORT,
    "Upstream Port": PciePortType.UPSTREAM,
    "Downstream Port": PciePortType.DOWNSTREAM,
    "PCI-Express to PCI/PCI-X Bridge": PciePortType.PCIE_TO_PCI,
    "Root Complex Integrated Endpoint": PciePortType.RC_INTEGRATED,
}


def _data(name: str) -> bytes:
    (entry,) = parse_dump(dump_text(name))
    return entry.data


def _u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def _pm(sign: str) -> bool:
    return sign == "+"


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_msi_decoding_matches_lspci(name: str) -> None:
    data = _data(name)
    for match in _MSI.finditer(vvv_text(name)):
        off = int(match["off"], 16)
        control = _u(data, off + MsiReg.CONTROL, 2)
        assert bool(control & MsiControl.ENABLE) == _pm(match["en"])
        assert bool(control & MsiControl.ADDR_64) == _pm(match["b64"])
        assert bool(control & MsiControl.PER_VECTOR_MASK) == _pm(match["mask"])
        assert msi_vectors_capable(control) == int(match["capable"])
        assert msi_vectors_enabled(control) == int(match["enabled"])
        layout = msi_layout(control)
        address = _u(data, off + MsiReg.ADDRESS_LO, 4)
        if layout.address_hi is not None:
            address |= _u(data, off + layout.address_hi, 4) << 32
        assert address == int(match["addr"], 16)
        assert _u(data, off + layout.data, 2) == int(match["data"], 16)


def test_every_msi_shape_is_exercised_by_the_data() -> None:
    shapes = set()
    for name in DUMP_NAMES:
        for match in _MSI.finditer(vvv_text(name)):
            shapes.add((match["mask"], match["b64"]))
    assert shapes == {("+", "+"), ("+", "-"), ("-", "+"), ("-", "-")}


def test_msi_layouts() -> None:
    plain = msi_layout(0)
    assert (plain.address_hi, plain.data, plain.mask, plain.pending, plain.size) == (
        None,
        0x08,
        None,
        None,
        10,
    )
    masked = msi_layout(MsiControl.PER_VECTOR_MASK)
    assert (masked.data, masked.mask, masked.pending, masked.size) == (0x08, 0x0C, 0x10, 20)
    wide = msi_layout(MsiControl.ADDR_64)
    assert (wide.address_hi, wide.data, wide.mask, wide.size) == (0x08, 0x0C, None, 14)
    both = msi_layout(MsiControl.ADDR_64 | MsiControl.PER_VECTOR_MASK)
    assert (both.data, both.mask, both.pending, both.size) == (0x0C, 0x10, 0x14, 24)
    # Reserved encodings above 32 vectors saturate rather than overflow.
    assert msi_vectors_capable(0xE) == 32
    assert msi_vectors_enabled(0x70) == 32


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_msix_decoding_matches_lspci(name: str) -> None:
    data = _data(name)
    for match in _MSIX.finditer(vvv_text(name)):
        off = int(match["off"], 16)
        control = _u(data, off + MsixReg.CONTROL, 2)
        assert msix_table_size(control) == int(match["count"])
        assert bool(control & MsixControl.ENABLE) == _pm(match["en"])
        assert bool(control & MsixControl.FUNCTION_MASK) == _pm(match["masked"])
        assert split_bir(_u(data, off + MsixReg.TABLE, 4)) == (
            int(match["tbir"]),
            int(match["toff"], 16),
        )
        assert split_bir(_u(data, off + MsixReg.PBA, 4)) == (
            int(match["pbir"]),
            int(match["poff"], 16),
        )


def test_msix_is_present_in_the_data() -> None:
    assert sum(len(_MSIX.findall(vvv_text(n))) for n in DUMP_NAMES) == 5


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_pm_control_matches_lspci(name: str) -> None:
    data = _data(name)
    for match in _PM_STATUS.finditer(vvv_text(name)):
        off = int(match["off"], 16)
        ctrl = _u(data, off + PmReg.CTRL, 2)
        assert ctrl & PmCtrl.STATE_MASK == int(match["state"])
        assert bool(ctrl & PmCtrl.NO_SOFT_RESET) == _pm(match["nsr"])
        assert bool(ctrl & PmCtrl.PME_ENABLE) == _pm(match["pme_en"])


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_pcie_flags_match_lspci(name: str) -> None:
    data = _data(name)
    for match in _EXPRESS.finditer(vvv_text(name)):
        off = int(match["off"], 16)
        flags = _u(data, off + PcieReg.FLAGS, 2)
        assert flags & PcieFlags.VERSION_MASK == int(match["ver"])
        kind = match["kind"].strip()
        assert PciePortType((flags & PcieFlags.TYPE_MASK) >> 4) is _PORT_TYPES[kind]


def test_pcie_register_offsets_are_the_spec_ones() -> None:
    assert (PcieReg.DEVCAP, PcieReg.DEVCTL, PcieReg.DEVSTA) == (0x04, 0x08, 0x0A)
    assert (PcieReg.LNKCAP, PcieReg.LNKCTL, PcieReg.LNKSTA) == (0x0C, 0x10, 0x12)
    assert (PcieReg.DEVCAP2, PcieReg.LNKCTL2, PcieReg.SLTSTA2) == (0x24, 0x30, 0x3A)


def test_pcie_capability_found_in_an_endpoint() -> None:
    data = _data("eth_intel_82576_sriov")
    exp = walk_capabilities(data).find(CapId.EXP)
    assert exp is not None
    devctl = _u(data, exp.offset + PcieReg.DEVCTL, 2)
    # lspci: "MaxPayload 256 bytes, MaxReadReq 512 bytes" for this NIC's DevCtl.
    assert 128 << ((devctl >> 5) & 7) == 256
    assert 128 << ((devctl >> 12) & 7) == 512


def test_the_decode_patterns_match_the_data() -> None:
    """Guard against the parametrized tests above passing by matching nothing."""
    texts = [vvv_text(n) for n in DUMP_NAMES]
    assert sum(len(_MSI.findall(t)) for t in texts) == 20
    assert sum(len(_PM_STATUS.findall(t)) for t in texts) == 26
    assert sum(len(_EXPRESS.findall(t)) for t in texts) == 16
