"""The pure PCI model: addresses, constants, config images, capabilities, BARs, dumps.

No I/O happens here and nothing here imports trio: every function works on
plain bytes and integers.
"""

from shared.pci._address import PciAddress
from shared.pci._config import CONFIG_SIZES, ConfigSpace, check_access
from shared.pci._constants import (
    CAP_POINTER_MASK,
    EXT_CAP_START,
    ROM_ENABLE,
    BarFlag,
    BridgeReg,
    CapId,
    Command,
    ExtCapId,
    HeaderType,
    Reg,
    Status,
)

__all__ = [
    "PciAddress",
    "ConfigSpace",
    "check_access",
    "CONFIG_SIZES",
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
