"""Register offsets and bit fields *inside* capability bodies.

Offsets are relative to the capability's own offset (the one a walk reports),
so the MSI control word of a capability at ``cap.offset`` lives at
``cap.offset + MsiReg.CONTROL``. Values follow the PCI Local Bus 3.0, PCI PM 1.2
and PCIe base specifications (the same names Linux's ``pci_regs.h`` uses, in
spelled-out form).

MSI is the one capability whose layout depends on its own contents (the
64-bit flag moves the data, mask and pending registers), so it gets a helper,
:func:`msi_layout`, instead of fixed offsets for those registers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "PmReg",
    "PmCap",
    "PmCtrl",
    "PM_STATE_MASK",
    "MsiReg",
    "MsiControl",
    "MsiLayout",
    "msi_layout",
    "msi_vectors_capable",
    "msi_vectors_enabled",
    "MsixReg",
    "MsixControl",
    "MsixEntry",
    "MSIX_TABLE_SIZE_MASK",
    "MSIX_BIR_MASK",
    "MSIX_OFFSET_MASK",
    "MSIX_ENTRY_SIZE",
    "MSIX_ENTRY_CTRL_MASKED",
    "msix_table_size",
    "split_bir",
    "PcieReg",
    "PcieFlags",
    "PciePortType",
    "DevCap",
    "DevCtl",
    "DevSta",
    "LnkCap",
    "LnkCtl",
    "LnkSta",
    "SltCap",
    "SltCtl",
    "SltSta",
    "AerReg",
]


# --------------------------------------------------------------------------
# Power management (CapId.PM)
# --------------------------------------------------------------------------


class PmReg(enum.IntEnum):
    """Power-management capability registers."""

    PMC = 0x02  # capabilities (16-bit, read-only)
    CTRL = 0x04  # PMCSR: control/status (16-bit)
    BRIDGE_EXT = 0x06  # PMCSR_BSE (8-bit)
    DATA = 0x07  # data register (8-bit)


class PmCap(enum.IntFlag):
    """Bits of the PMC register (``PmReg.PMC``)."""

    VERSION_MASK = 0x0007
    PME_CLOCK = 0x0008
    IMM_READINESS = 0x0010
    DSI = 0x0020
    AUX_CURRENT_MASK = 0x01C0
    D1 = 0x0200
    D2 = 0x0400
    PME_D0 = 0x0800
    PME_D1 = 0x1000
    PME_D2 = 0x2000
    PME_D3HOT = 0x4000
    PME_D3COLD = 0x8000


class PmCtrl(enum.IntFlag):
    """Bits of the PMCSR register (``PmReg.CTRL``)."""

    STATE_MASK = 0x0003  # D0..D3hot
    NO_SOFT_RESET = 0x0008
    PME_ENABLE = 0x0100
    DATA_SELECT_MASK = 0x1E00
    DATA_SCALE_MASK = 0x6000
    PME_STATUS = 0x8000  # RW1C


#: The power-state field of PMCSR, as a plain int for masking.
PM_STATE_MASK = 0x0003


# --------------------------------------------------------------------------
# MSI (CapId.MSI)
# --------------------------------------------------------------------------


class MsiReg(enum.IntEnum):
    """MSI registers. Data, mask and pending move with the 64-bit flag: see :func:`msi_layout`."""

    CONTROL = 0x02  # message control (16-bit)
    ADDRESS_LO = 0x04  # message address (32-bit)
    ADDRESS_HI = 0x08  # upper address, only when MsiControl.ADDR_64 is set
    DATA_32 = 0x08  # message data of a 32-bit capability
    DATA_64 = 0x0C  # message data of a 64-bit capability
    MASK_32 = 0x0C  # mask bits (per-vector masking, 32-bit)
    MASK_64 = 0x10  # mask bits (per-vector masking, 64-bit)
    PENDING_32 = 0x10
    PENDING_64 = 0x14


class MsiControl(enum.IntFlag):
    """Bits of the MSI message-control register."""

    ENABLE = 0x0001
    MULTIPLE_CAPABLE_MASK = 0x000E  # log2 of the vectors the function requests
    MULTIPLE_ENABLE_MASK = 0x0070  # log2 of the vectors software granted
    ADDR_64 = 0x0080
    PER_VECTOR_MASK = 0x0100
    EXT_DATA_CAPABLE = 0x0200
    EXT_DATA_ENABLE = 0x0400


@dataclass(frozen=True, slots=True)
class MsiLayout:
    """Where the variable MSI registers sit, relative to the capability offset.

    ``address_hi``, ``mask`` and ``pending`` are ``None`` when the capability
    does not implement them. ``size`` is the capability's total length in bytes.
    """

    address_hi: int | None
    data: int
    mask: int | None
    pending: int | None
    size: int


def msi_layout(control: int) -> MsiLayout:
    """The register layout an MSI capability with message-control ``control`` has."""
    is_64 = bool(control & MsiControl.ADDR_64)
    maskable = bool(control & MsiControl.PER_VECTOR_MASK)
    if is_64:
        if maskable:
            return MsiLayout(
                MsiReg.ADDRESS_HI, MsiReg.DATA_64, MsiReg.MASK_64, MsiReg.PENDING_64, 24
            )
        return MsiLayout(MsiReg.ADDRESS_HI, MsiReg.DATA_64, None, None, 14)
    if maskable:
        return MsiLayout(None, MsiReg.DATA_32, MsiReg.MASK_32, MsiReg.PENDING_32, 20)
    return MsiLayout(None, MsiReg.DATA_32, None, None, 10)


def msi_vectors_capable(control: int) -> int:
    """Vectors the function requests (Multiple Message Capable, decoded: 1..32)."""
    return 1 << min((control & MsiControl.MULTIPLE_CAPABLE_MASK) >> 1, 5)


def msi_vectors_enabled(control: int) -> int:
    """Vectors software enabled (Multiple Message Enable, decoded: 1..32)."""
    return 1 << min((control & MsiControl.MULTIPLE_ENABLE_MASK) >> 4, 5)


# --------------------------------------------------------------------------
# MSI-X (CapId.MSIX)
# --------------------------------------------------------------------------


class MsixReg(enum.IntEnum):
    """MSI-X capability registers."""

    CONTROL = 0x02  # message control (16-bit)
    TABLE = 0x04  # table offset | BIR (32-bit)
    PBA = 0x08  # pending-bit-array offset | BIR (32-bit)


class MsixControl(enum.IntFlag):
    """Bits of the MSI-X message-control register."""

    TABLE_SIZE_MASK = 0x07FF  # N-1 encoded
    FUNCTION_MASK = 0x4000
    ENABLE = 0x8000


class MsixEntry(enum.IntEnum):
    """Fields of one 16-byte MSI-X table entry (in the BAR, not in config space)."""

    ADDRESS_LO = 0x0
    ADDRESS_HI = 0x4
    DATA = 0x8
    VECTOR_CTRL = 0xC


MSIX_TABLE_SIZE_MASK = 0x07FF
#: Low three bits of the table/PBA registers select the BAR (BIR).
MSIX_BIR_MASK = 0x7
#: The rest is the QWORD-aligned offset into that BAR.
MSIX_OFFSET_MASK = 0xFFFF_FFF8
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_CTRL_MASKED = 0x1


def msix_table_size(control: int) -> int:
    """Number of MSI-X table entries (the register holds N-1)."""
    return (control & MSIX_TABLE_SIZE_MASK) + 1


def split_bir(value: int) -> tuple[int, int]:
    """Split an MSI-X table or PBA register into ``(bir, offset)``."""
    return value & MSIX_BIR_MASK, value & MSIX_OFFSET_MASK


# --------------------------------------------------------------------------
# PCI Express (CapId.EXP)
# --------------------------------------------------------------------------


class PcieReg(enum.IntEnum):
    """PCI Express capability registers (version 2 layout; v1 stops at ROOT_STATUS)."""

    FLAGS = 0x02
    DEVCAP = 0x04
    DEVCTL = 0x08
    DEVSTA = 0x0A
    LNKCAP = 0x0C
    LNKCTL = 0x10
    LNKSTA = 0x12
    SLTCAP = 0x14
    SLTCTL = 0x18
    SLTSTA = 0x1A
    RTCTL = 0x1C
    RTCAP = 0x1E
    RTSTA = 0x20
    DEVCAP2 = 0x24
    DEVCTL2 = 0x28
    DEVSTA2 = 0x2A
    LNKCAP2 = 0x2C
    LNKCTL2 = 0x30
    LNKSTA2 = 0x32
    SLTCAP2 = 0x34
    SLTCTL2 = 0x38
    SLTSTA2 = 0x3A


class PcieFlags(enum.IntFlag):
    """Bits of the PCIe capabilities register (``PcieReg.FLAGS``)."""

    VERSION_MASK = 0x000F
    TYPE_MASK = 0x00F0
    SLOT = 0x0100
    IRQ_MASK = 0x3E00


class PciePortType(enum.IntEnum):
    """Device/port type, ``(flags & PcieFlags.TYPE_MASK) >> 4``."""

    ENDPOINT = 0x0
    LEGACY_ENDPOINT = 0x1
    ROOT_PORT = 0x4
    UPSTREAM = 0x5
    DOWNSTREAM = 0x6
    PCIE_TO_PCI = 0x7
    PCI_TO_PCIE = 0x8
    RC_INTEGRATED = 0x9
    RC_EVENT_COLLECTOR = 0xA


class DevCap(enum.IntFlag):
    PAYLOAD_MASK = 0x0000_0007
    PHANTOM_MASK = 0x0000_0018
    EXT_TAG = 0x0000_0020
    L0S_LATENCY_MASK = 0x0000_01C0
    L1_LATENCY_MASK = 0x0000_0E00
    ROLE_BASED_ERR = 0x0000_8000
    SLOT_POWER_VALUE_MASK = 0x03FC_0000
    SLOT_POWER_SCALE_MASK = 0x0C00_0000
    FLR = 0x1000_0000


class DevCtl(enum.IntFlag):
    CORR_ERR_REPORT = 0x0001
    NONFATAL_REPORT = 0x0002
    FATAL_REPORT = 0x0004
    UNSUP_REQ_REPORT = 0x0008
    RELAXED_ORDERING = 0x0010
    PAYLOAD_MASK = 0x00E0
    EXT_TAG = 0x0100
    PHANTOM = 0x0200
    AUX_PME = 0x0400
    NO_SNOOP = 0x0800
    READ_REQ_MASK = 0x7000
    BRIDGE_CFG_RETRY_OR_FLR = 0x8000  # FLR on endpoints, config-retry on bridges


class DevSta(enum.IntFlag):
    CORR_ERR = 0x0001  # RW1C
    NONFATAL_ERR = 0x0002  # RW1C
    FATAL_ERR = 0x0004  # RW1C
    UNSUP_REQ = 0x0008  # RW1C
    AUX_POWER = 0x0010
    TRANSACTIONS_PENDING = 0x0020
    EMERGENCY_POWER = 0x0040


class LnkCap(enum.IntFlag):
    SPEED_MASK = 0x0000_000F
    WIDTH_MASK = 0x0000_03F0
    ASPM_MASK = 0x0000_0C00
    L0S_EXIT_MASK = 0x0000_7000
    L1_EXIT_MASK = 0x0003_8000
    CLOCK_PM = 0x0004_0000
    SURPRISE_DOWN = 0x0008_0000
    DLL_ACTIVE_REPORTING = 0x0010_0000
    BW_NOTIFY = 0x0020_0000
    ASPM_COMPLIANCE = 0x0040_0000
    PORT_MASK = 0xFF00_0000


class LnkCtl(enum.IntFlag):
    ASPM_L0S = 0x0001
    ASPM_L1 = 0x0002
    RCB = 0x0008
    LINK_DISABLE = 0x0010
    RETRAIN = 0x0020
    COMMON_CLOCK = 0x0040
    EXT_SYNCH = 0x0080
    CLOCK_PM = 0x0100
    HW_AUTO_WIDTH_DISABLE = 0x0200
    BW_MGMT_IRQ = 0x0400
    AUTO_BW_IRQ = 0x0800


class LnkSta(enum.IntFlag):
    SPEED_MASK = 0x000F
    WIDTH_MASK = 0x03F0
    TRAINING = 0x0800
    SLOT_CLOCK = 0x1000
    DLL_ACTIVE = 0x2000
    BW_MGMT = 0x4000  # RW1C
    AUTO_BW = 0x8000  # RW1C


class SltCap(enum.IntFlag):
    ATTN_BUTTON = 0x0000_0001
    POWER_CTRL = 0x0000_0002
    MRL_SENSOR = 0x0000_0004
    ATTN_INDICATOR = 0x0000_0008
    POWER_INDICATOR = 0x0000_0010
    HOT_PLUG_SURPRISE = 0x0000_0020
    HOT_PLUG_CAPABLE = 0x0000_0040
    POWER_LIMIT_VALUE_MASK = 0x0000_7F80
    POWER_LIMIT_SCALE_MASK = 0x0001_8000
    EM_INTERLOCK = 0x0002_0000
    NO_CMD_COMPLETED = 0x0004_0000
    PHYSICAL_SLOT_MASK = 0xFFF8_0000


class SltCtl(enum.IntFlag):
    ATTN_BUTTON_EN = 0x0001
    POWER_FAULT_EN = 0x0002
    MRL_SENSOR_EN = 0x0004
    PRESENCE_DETECT_EN = 0x0008
    CMD_COMPLETED_EN = 0x0010
    HOT_PLUG_IRQ_EN = 0x0020
    ATTN_INDICATOR_MASK = 0x00C0
    POWER_INDICATOR_MASK = 0x0300
    POWER_CTRL = 0x0400
    EM_INTERLOCK_CTRL = 0x0800
    DLL_STATE_CHANGED_EN = 0x1000


class SltSta(enum.IntFlag):
    ATTN_BUTTON = 0x0001  # RW1C
    POWER_FAULT = 0x0002  # RW1C
    MRL_SENSOR_CHANGED = 0x0004  # RW1C
    PRESENCE_DETECT_CHANGED = 0x0008  # RW1C
    CMD_COMPLETED = 0x0010  # RW1C
    MRL_SENSOR_STATE = 0x0020
    PRESENCE_DETECT_STATE = 0x0040
    EM_INTERLOCK = 0x0080
    DLL_STATE_CHANGED = 0x0100  # RW1C


# --------------------------------------------------------------------------
# Advanced Error Reporting (ExtCapId.ERR)
# --------------------------------------------------------------------------


class AerReg(enum.IntEnum):
    """AER extended-capability registers (relative to the extended header)."""

    UNCOR_STATUS = 0x04  # RW1C
    UNCOR_MASK = 0x08
    UNCOR_SEVERITY = 0x0C
    COR_STATUS = 0x10  # RW1C
    COR_MASK = 0x14
    CAP_CONTROL = 0x18
    HEADER_LOG = 0x1C  # 16 bytes
    ROOT_COMMAND = 0x2C  # root ports only
    ROOT_STATUS = 0x30
    ERROR_SOURCE = 0x34
