"""Config-space register offsets, bit fields and capability IDs (PCI Local Bus 3.0, PCIe 6)."""

from __future__ import annotations

import enum

__all__ = [
    "Reg",
    "BridgeReg",
    "Command",
    "Status",
    "HeaderType",
    "BarFlag",
    "CapId",
    "ExtCapId",
    "CAP_POINTER_MASK",
    "EXT_CAP_START",
    "ROM_ENABLE",
]


class Reg(enum.IntEnum):
    """Type 0 (endpoint) header register offsets."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    PROG_IF = 0x09
    SUBCLASS = 0x0A
    CLASS = 0x0B
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BAR0 = 0x10
    BAR1 = 0x14
    BAR2 = 0x18
    BAR3 = 0x1C
    BAR4 = 0x20
    BAR5 = 0x24
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITY_LIST = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


class BridgeReg(enum.IntEnum):
    """Type 1 (PCI-to-PCI bridge) header registers that differ from type 0."""

    PRIMARY_BUS = 0x18
    SECONDARY_BUS = 0x19
    SUBORDINATE_BUS = 0x1A
    SEC_LATENCY_TIMER = 0x1B
    IO_BASE = 0x1C
    IO_LIMIT = 0x1D
    SEC_STATUS = 0x1E
    MEMORY_BASE = 0x20
    MEMORY_LIMIT = 0x22
    PREF_MEMORY_BASE = 0x24
    PREF_MEMORY_LIMIT = 0x26
    PREF_BASE_UPPER32 = 0x28
    PREF_LIMIT_UPPER32 = 0x2C
    IO_BASE_UPPER16 = 0x30
    IO_LIMIT_UPPER16 = 0x32
    ROM_ADDRESS = 0x38
    BRIDGE_CONTROL = 0x3E


class Command(enum.IntFlag):
    IO = 0x0001
    MEMORY = 0x0002
    MASTER = 0x0004
    SPECIAL = 0x0008
    INVALIDATE = 0x0010
    VGA_PALETTE = 0x0020
    PARITY = 0x0040
    WAIT = 0x0080
    SERR = 0x0100
    FAST_BACK = 0x0200
    INTX_DISABLE = 0x0400


class Status(enum.IntFlag):
    IMM_READINESS = 0x0001
    INTERRUPT = 0x0008
    CAP_LIST = 0x0010
    MHZ66 = 0x0020
    FAST_BACK = 0x0080
    PARITY = 0x0100  # master data parity error (RW1C)
    DEVSEL_MASK = 0x0600
    SIG_TARGET_ABORT = 0x0800  # RW1C
    REC_TARGET_ABORT = 0x1000  # RW1C
    REC_MASTER_ABORT = 0x2000  # RW1C
    SIG_SYSTEM_ERROR = 0x4000  # RW1C
    DETECTED_PARITY = 0x8000  # RW1C


class HeaderType(enum.IntEnum):
    NORMAL = 0
    BRIDGE = 1
    CARDBUS = 2

    MULTI_FUNCTION = 0x80  # bit 7 of the header-type byte, not a layout


class BarFlag(enum.IntFlag):
    IO_SPACE = 0x1
    MEM_TYPE_64 = 0x4
    MEM_TYPE_1M = 0x2  # legacy "below 1 MiB" type, reserved in PCI 3.0
    PREFETCH = 0x8


#: Low two bits of a capability pointer are reserved and must be ignored.
CAP_POINTER_MASK = 0xFC
#: Extended capabilities start here in PCIe config space.
EXT_CAP_START = 0x100
#: Bit 0 of the expansion ROM BAR.
ROM_ENABLE = 0x1


class CapId(enum.IntEnum):
    """Standard capability IDs (config offset 0x34 list)."""

    PM = 0x01
    AGP = 0x02
    VPD = 0x03
    SLOT_ID = 0x04
    MSI = 0x05
    CHSWP = 0x06
    PCIX = 0x07
    HT = 0x08
    VNDR = 0x09
    DBG = 0x0A
    CCRC = 0x0B
    SHPC = 0x0C
    SSVID = 0x0D
    AGP3 = 0x0E
    SECDEV = 0x0F
    EXP = 0x10
    MSIX = 0x11
    SATA = 0x12
    AF = 0x13
    EA = 0x14
    FPB = 0x15


class ExtCapId(enum.IntEnum):
    """Extended capability IDs (PCIe, from offset 0x100)."""

    ERR = 0x01  # AER
    VC = 0x02
    DSN = 0x03
    PWR = 0x04
    RCLD = 0x05
    RCILC = 0x06
    RCEC = 0x07
    MFVC = 0x08
    VC9 = 0x09
    RCRB = 0x0A
    VNDR = 0x0B
    CAC = 0x0C
    ACS = 0x0D
    ARI = 0x0E
    ATS = 0x0F
    SRIOV = 0x10
    MRIOV = 0x11
    MCAST = 0x12
    PRI = 0x13
    AMD_XXX = 0x14
    REBAR = 0x15
    DPA = 0x16
    TPH = 0x17
    LTR = 0x18
    SECPCI = 0x19
    PMUX = 0x1A
    PASID = 0x1B
    LNR = 0x1C
    DPC = 0x1D
    L1SS = 0x1E
    PTM = 0x1F
    MPHY = 0x20
    FRS = 0x21
    RTR = 0x22
    DVSEC = 0x23
    VF_REBAR = 0x24
    DLNK = 0x25
    PL_16GT = 0x26
    LMR = 0x27
    HIER_ID = 0x28
    NPEM = 0x29
    PL_32GT = 0x2A
    DOE = 0x2E
    IDE = 0x30
    PL_64GT = 0x31
