"""Table-driven tests: one row per register rule of the default policy, on a synthetic device.

Each row is a guest write; it says whether the policy refuses it, exactly
which writes reach the device, and what the guest reads back afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from _policy_support import (
    AER,
    DSN,
    MSI,
    MSIX,
    PCIE,
    PM,
    SRIOV,
    VNDR,
    VPD,
    synthetic_device,
)

from pciback.policy import AccessDeniedError, AuditLog, PolicedDevice, PolicyConfig, Preset
from shared.errors import ConfigAccessError, ErrorCode


@dataclass(frozen=True)
class Row:
    rule: str
    offset: int
    size: int
    value: int
    denied: bool = False
    device: tuple[tuple[int, int, int], ...] = ()
    readback: int | None = None
    read: tuple[int, int] | None = None  # where to read back, when not (offset, size)


DENY = True
ROWS = [
    # ---- identification: read-only, every write refused
    Row("vendor_id", 0x00, 2, 0x8086, DENY),
    Row("device_id", 0x02, 2, 0xFFFF, DENY),
    Row("revision_id", 0x08, 1, 0x02, DENY),
    Row("class_code", 0x09, 1, 0x00, DENY),
    Row("class_code", 0x0B, 1, 0x03, DENY),
    Row("header_type", 0x0E, 1, 0x80, DENY),
    Row("subsystem_vendor_id", 0x2C, 2, 0x1234, DENY),
    Row("subsystem_id", 0x2E, 2, 0x1234, DENY),
    Row("cardbus_cis", 0x28, 4, 1, DENY),
    Row("capabilities_pointer", 0x34, 1, 0x50, DENY),
    Row("interrupt_pin", 0x3D, 1, 0x02, DENY),
    Row("min_gnt", 0x3E, 1, 0x01, DENY),
    Row("max_lat", 0x3F, 1, 0x01, DENY),
    Row("unlisted", 0x35, 1, 0x01, DENY),
    Row("unlisted", 0xE0, 4, 0, DENY),
    # ---- Command: decode and bus master reach the device, the rest is virtual (XSA-120)
    Row("command.io", 0x04, 2, 0x0147, device=((0x04, 1, 0x47),), readback=0x0147),
    Row("command.memory", 0x04, 2, 0x0144, device=((0x04, 1, 0x44),), readback=0x0144),
    Row("command.bus_master", 0x04, 1, 0x42, device=((0x04, 1, 0x42),), readback=0x42),
    Row("command.intx_disable", 0x04, 2, 0x0546, device=((0x04, 1, 0x46),), readback=0x0546),
    Row("command.intx_disable", 0x05, 1, 0x05, readback=0x0546, read=(0x04, 2)),
    Row("command.other", 0x04, 2, 0x0006, device=((0x04, 1, 0x46),), readback=0x0006),
    Row("command.other", 0x04, 2, 0xFFFF, device=((0x04, 1, 0x47),), readback=0xFFFF),
    # ---- Status: RW1C error bits are cleared on the device; nothing else changes
    # (RecordingDevice is plain memory, so only the device writes are checked here)
    Row("status.errors", 0x06, 2, 0x0800, device=((0x07, 1, 0x08),)),
    Row("status.errors", 0x07, 1, 0x40, device=((0x07, 1, 0x40),)),
    Row("status.other", 0x06, 2, 0x0000, readback=0x4810),
    Row("status.cap_list", 0x06, 1, 0x00, readback=0x4810, read=(0x06, 2)),
    # a dword write spanning Command and Status splits by field
    Row("command+status", 0x04, 4, 0x0800_0147, device=((0x04, 1, 0x47), (0x07, 1, 0x08))),
    # ---- cache line size: read/write; latency timer and BIST refused
    Row("cache_line_size", 0x0C, 1, 0x20, device=((0x0C, 1, 0x20),), readback=0x20),
    Row("latency_timer", 0x0D, 1, 0x40, DENY),
    Row("bist", 0x0F, 1, 0xC0, DENY),
    Row("cache_line_size+latency", 0x0C, 2, 0x0020, DENY),
    # ---- BARs: virtual, sizing works, nothing reaches the device
    Row("bar0.address", 0x10, 4, 0xFFFF_FFFF, readback=0xFFFF_F000),
    Row("bar0.address", 0x10, 4, 0x1234_5678, readback=0x1234_5000),
    Row("bar0.address", 0x13, 1, 0xAB, readback=0xAB00_0000, read=(0x10, 4)),
    Row("bar1.address", 0x14, 4, 0xFFFF_FFFF, readback=0xFFFF_FFE1),
    Row("bar1.address", 0x14, 4, 0x0000_C020, readback=0x0000_C021),
    Row("bar2.address", 0x18, 4, 0xFFFF_FFFF, readback=0xFFF0_000C),
    Row("bar3.address", 0x1C, 4, 0xFFFF_FFFF, readback=0xFFFF_FFFF),
    Row("bar3.address", 0x1C, 4, 0x0000_0001, readback=0x0000_0001),
    Row("bar4", 0x20, 4, 0xFFFF_FFFF, readback=0),
    Row("bar5.address", 0x24, 4, 0xFFFF_FFFF, readback=0xFFFF_FFF0),
    # ---- expansion ROM: virtual, with the enable bit
    Row("rom.address", 0x30, 4, 0xFFFF_F800, readback=0xFFFF_0000),
    Row("rom.enable", 0x30, 4, 0xC008_0001, readback=0xC008_0001),
    # ---- interrupt line: the guest's own value
    Row("interrupt_line", 0x3C, 1, 0x0A, readback=0x0A),
    Row("interrupt_line+pin", 0x3C, 2, 0x010A, DENY),
    # ---- capability headers
    Row("pm.header", PM, 2, 0x5001, DENY),
    Row("msi.next", MSI + 1, 1, 0x00, DENY),
    Row("aer.header", AER, 4, 0, DENY),
    # ---- PM: control emulated, PME status cleared on the device
    Row("pm.pmc", PM + 2, 2, 0, DENY),
    Row("pm.pmcsr.control", PM + 4, 2, 0x0003, readback=0x8003),
    Row("pm.pmcsr.pme_status", PM + 4, 2, 0x8000, device=((PM + 5, 1, 0x80),), readback=0x8000),
    Row("pm.data", PM + 7, 1, 0, DENY),
    # ---- MSI: control, address, data and mask emulated; never written through (XSA-128/129)
    Row("msi.control.enable", MSI + 2, 2, 0x0001, readback=0x0185),
    Row("msi.control.mme", MSI + 2, 2, 0x0020, readback=0x01A4),
    Row("msi.control.ro", MSI + 2, 2, 0x0000, readback=0x0184),
    Row("msi.control.ext_data_enable", MSI + 2, 2, 0x0400, readback=0x0584),
    Row("msi.address", MSI + 4, 4, 0xFEE0_1000, readback=0xFEE0_1000),
    Row("msi.address_hi", MSI + 8, 4, 0x1, readback=0x1),
    Row("msi.data", MSI + 0xC, 2, 0x4099, readback=0x4099),
    Row("msi.data+ext_data", MSI + 0xC, 4, 0x0000_4099, readback=0x4099),
    Row("msi.ext_data", MSI + 0xE, 2, 0x0001, readback=0x0001),
    Row("msi.mask", MSI + 0x10, 4, 0xF, readback=0xF),
    Row("msi.pending", MSI + 0x14, 4, 0x1, DENY),
    # ---- MSI-X: control emulated, table/PBA read-only
    Row("msix.control.enable", MSIX + 2, 2, 0x8000, readback=0x8007),
    Row("msix.control.function_mask", MSIX + 3, 1, 0x40, readback=0x4007, read=(MSIX + 2, 2)),
    Row("msix.table", MSIX + 4, 4, 0x0000_1000, DENY),
    Row("msix.pba", MSIX + 8, 4, 0x0000_1000, DENY),
    # ---- PCIe: device control follows the policy (virtual by default), FLR refused
    Row("pcie.flags", PCIE + 2, 2, 0, DENY),
    Row("pcie.devcap", PCIE + 4, 4, 0, DENY),
    Row("pcie.devctl.control", PCIE + 8, 2, 0x5000, readback=0x5000),
    Row("pcie.devctl.flr", PCIE + 8, 2, 0xA810, DENY),
    Row("pcie.devsta.errors", PCIE + 0xA, 2, 0x0001, device=((PCIE + 0xA, 1, 0x01),)),
    Row("pcie.linkcap", PCIE + 0xC, 4, 0, DENY),
    Row("pcie.linkctl", PCIE + 0x10, 2, 0x0043, readback=0x0043),
    Row("pcie.linksta.changes", PCIE + 0x12, 2, 0x0000, readback=0x1041),
    Row("pcie.slotctl", PCIE + 0x18, 2, 0x0400, DENY),
    Row("pcie.rootctl", PCIE + 0x1C, 2, 0x1, DENY),
    Row("pcie.devctl2", PCIE + 0x28, 2, 0x0400, readback=0x0400),
    Row("pcie.linkctl2", PCIE + 0x30, 2, 0x0002, readback=0x0002),
    # ---- VPD and other capability bodies: read-only by default
    Row("vpd.address", VPD + 2, 2, 0x8000, DENY),
    Row("vpd.data", VPD + 4, 4, 0x1, DENY),
    Row("vndr.body", VNDR + 4, 4, 0x1, DENY),
    # ---- extended capabilities: read-only by default
    Row("aer.uncorrectable_status", AER + 4, 4, 0x1000, DENY),
    Row("aer.uncorrectable_mask", AER + 8, 4, 0x1, DENY),
    Row("aer.capabilities", AER + 0x18, 4, 0x1, DENY),
    Row("dsn.body", DSN + 4, 4, 0, DENY),
    Row("sriov.body", SRIOV + 8, 2, 0x1, DENY),
]


def _id(row: Row) -> str:
    return f"{row.rule}@{row.offset:#x}/{row.size}={row.value:#x}"


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_default_policy_rule(row: Row) -> None:
    provider = synthetic_device()
    dev = PolicedDevice(provider, guest="g1", device="00:01.0", audit=AuditLog())
    before = bytes(provider.memory)
    if row.denied:
        with pytest.raises(AccessDeniedError) as info:
            dev.config_write(row.offset, row.size, row.value)
        assert info.value.code is ErrorCode.ACCESS_DENIED
        assert provider.writes == []
        assert bytes(provider.memory) == before
        return
    dev.config_write(row.offset, row.size, row.value)
    assert provider.writes == list(row.device)
    if row.readback is not None:
        offset, size = row.read or (row.offset, row.size)
        assert dev.config_read(offset, size) == row.readback


def test_every_rule_name_of_the_synthetic_device_has_a_row() -> None:
    """The table above covers every register the default policy models (besides read-only IDs)."""
    dev = PolicedDevice(synthetic_device(), guest="g", device="d")
    covered = {row.rule.split("+")[0] for row in ROWS}
    writable = {
        g.name
        for f in dev.table
        for g in f.groups
        if g.allowed and g.access.name in ("RW", "RW1C", "EMULATED")
    }
    missing = {
        name for name in writable if name not in covered and name.rsplit(".", 1)[0] not in covered
    }
    assert missing == set()


def test_initial_virtual_values_hide_host_state() -> None:
    dev = PolicedDevice(synthetic_device(), guest="g", device="d")
    assert dev.config_read(0x10, 4) == 0x0000_0000  # host address 0xfeb00000 hidden
    assert dev.config_read(0x14, 4) == 0x0000_0001  # I/O flag kept
    assert dev.config_read(0x18, 4) == 0x0000_000C  # 64-bit prefetchable flags
    assert dev.config_read(0x1C, 4) == 0
    assert dev.config_read(0x20, 4) == 0  # unimplemented
    assert dev.config_read(0x30, 4) == 0  # ROM disabled, unassigned
    assert dev.config_read(0x3C, 1) == 0xFF  # never the host IRQ (0x0b)
    assert dev.config_read(0x3D, 1) == 0x01
    assert dev.config_read(MSI + 2, 2) == 0x0184  # host's MSI enable not shown
    assert dev.config_read(MSI + 4, 4) == 0  # host's MSI address not shown
    assert dev.config_read(MSI + 0xC, 2) == 0
    assert dev.config_read(0x04, 2) == 0x0146  # command: the device's value


def test_msi_state_exposes_the_virtual_programming() -> None:
    dev = PolicedDevice(synthetic_device(), guest="g", device="d")
    dev.config_write(MSI + 4, 4, 0xFEE0_1000)
    dev.config_write(MSI + 8, 4, 0x1)
    dev.config_write(MSI + 0xC, 2, 0x4099)
    dev.config_write(MSI + 2, 2, 0x0021)
    state = dev.msi_state()
    assert state is not None
    assert (state.enabled, state.vectors_enabled) == (True, 4)
    assert (state.address, state.data, state.mask) == (0x1_FEE0_1000, 0x4099, 0)
    dev.config_write(MSIX + 2, 2, 0xC000)
    msix = dev.msix_state()
    assert msix is not None
    assert (msix.enabled, msix.function_masked, msix.table_size) == (True, True, 8)
    assert dev.provider.writes == []  # type: ignore[attr-defined]


def test_bar_address_reports_the_guest_programming() -> None:
    dev = PolicedDevice(synthetic_device(), guest="g", device="d")
    dev.config_write(0x18, 4, 0xC010_0000)
    dev.config_write(0x1C, 4, 0x2)
    dev.config_write(0x14, 4, 0xC040)
    assert dev.bar_address(2) == 0x2_C010_0000
    assert dev.bar_address(1) == 0xC040
    assert dev.bar_address(4) is None


def test_misaligned_and_out_of_range_accesses_are_rejected() -> None:
    dev = PolicedDevice(synthetic_device(), guest="g", device="d")
    with pytest.raises(ConfigAccessError):
        dev.config_read(0x05, 2)
    with pytest.raises(ConfigAccessError):
        dev.config_write(0x1000, 1, 0)
    with pytest.raises(ConfigAccessError):
        dev.config_write(0x10, 3, 0)


# --------------------------------------------------------------------- allow / deny lists
def test_deny_bus_master_refuses_a_change_but_accepts_read_modify_write() -> None:
    provider = synthetic_device()
    dev = PolicedDevice(provider, PolicyConfig(deny=("command.bus_master",)), guest="g", device="d")
    with pytest.raises(AccessDeniedError) as info:
        dev.config_write(0x04, 2, 0x0142)  # clears bus master
    assert info.value.rule == "command.bus_master"
    dev.config_write(0x04, 2, 0x0147)  # sets I/O, keeps bus master as read
    assert provider.writes == [(0x04, 1, 0x47)]


def test_allow_intx_disable_passes_it_to_the_device() -> None:
    provider = synthetic_device()
    dev = PolicedDevice(
        provider, PolicyConfig(allow=("command.intx_disable",)), guest="g", device="d"
    )
    dev.config_write(0x04, 2, 0x0546)
    assert provider.writes == [(0x04, 2, 0x0546)]
    assert provider.config_read(0x04, 2) == 0x0546


def test_allow_pcie_devctl_passes_control_bits_but_never_flr() -> None:
    provider = synthetic_device()
    dev = PolicedDevice(provider, PolicyConfig(allow=("pcie.devctl",)), guest="g", device="d")
    dev.config_write(PCIE + 8, 2, 0x2830)
    assert provider.writes == [(PCIE + 8, 2, 0x2830)]
    with pytest.raises(AccessDeniedError):
        dev.config_write(PCIE + 8, 2, 0xA830)


def test_deny_pcie_devctl_refuses_changes() -> None:
    dev = PolicedDevice(
        synthetic_device(), PolicyConfig(deny=("pcie.devctl",)), guest="g", device="d"
    )
    with pytest.raises(AccessDeniedError):
        dev.config_write(PCIE + 8, 2, 0x5000)


def test_deny_bar_writes_by_policy() -> None:
    dev = PolicedDevice(synthetic_device(), PolicyConfig(deny=("bar0",)), guest="g", device="d")
    with pytest.raises(AccessDeniedError):
        dev.config_write(0x10, 4, 0xFFFF_FFFF)


# --------------------------------------------------------------------- presets
def test_transparent_readonly_refuses_every_write_and_reaches_nothing() -> None:
    provider = synthetic_device()
    dev = PolicedDevice(
        provider, PolicyConfig(preset=Preset.TRANSPARENT_READONLY), guest="g", device="d"
    )
    for offset in range(0x200):
        current = dev.config_read(offset, 1)
        with pytest.raises(AccessDeniedError):
            dev.config_write(offset, 1, current ^ 0x01)
        with pytest.raises(AccessDeniedError):
            dev.config_write(offset, 1, current)
    assert provider.writes == []
    # MSI is read from the device in this preset (it is not a virtual field).
    assert dev.config_read(MSI + 4, 4) == 0xFEE0_0000


def test_permissive_passes_unlisted_and_unprotected_but_never_protected() -> None:
    provider = synthetic_device()
    dev = PolicedDevice(provider, PolicyConfig(preset=Preset.PERMISSIVE), guest="g", device="d")
    dev.config_write(0xE0, 4, 0x1234_5678)  # device-specific register
    dev.config_write(PCIE + 8, 2, 0x2830)  # device control
    dev.config_write(0x0D, 1, 0x40)  # latency timer
    dev.config_write(AER + 8, 4, 0x1)  # AER mask
    assert provider.writes == [
        (0xE0, 4, 0x1234_5678),
        (PCIE + 8, 2, 0x2830),
        (0x0D, 1, 0x40),
        (AER + 8, 4, 0x1),
    ]
    provider.writes.clear()
    dev.config_write(0x10, 4, 0xFFFF_FFFF)  # BAR: still virtual
    dev.config_write(MSI + 4, 4, 0xFEE0_2000)  # MSI: still emulated
    dev.config_write(0x3C, 1, 0x05)  # interrupt line: still virtual
    assert provider.writes == []
    for offset, size, value in [
        (0x00, 2, 0x1),  # vendor ID
        (0x34, 1, 0x40),  # capability pointer
        (MSIX + 4, 4, 0),  # MSI-X table offset
        (SRIOV + 8, 2, 1),  # SR-IOV control: never (the guest would create VFs on the host)
        (PCIE + 8, 2, 0xA830),  # FLR
    ]:
        with pytest.raises(AccessDeniedError):
            dev.config_write(offset, size, value)
    assert provider.writes == []
