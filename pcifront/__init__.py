"""pcifront: the guest agent. Presents the backend's devices as a virtual PCI bus.

    async with pcifront.connect("unix:./pciback.sock", guest="guest0") as bus:
        dev = bus.devices[0]
        vendor = await dev.config_read(0, 2)
"""

from pcifront._client import FRONTEND_FEATURES, Bus, BusStatistics, Device, connect
from pcifront._errors import (
    AccessDeniedError,
    BackendBusyError,
    ConnectionLostError,
    DeviceNotFoundError,
    HandshakeError,
    InvalidAccessError,
    NotImplementedOpError,
    OperationFailedError,
    RequestError,
    error_for_code,
)
from pcifront._lspci import LspciOptionError, filter_devices, format_listing, render_lspci
from pcifront._pciids import PciIds
from shared.errors import ErrorCode

__all__ = [
    "connect",
    "Bus",
    "Device",
    "BusStatistics",
    "FRONTEND_FEATURES",
    "ErrorCode",
    "RequestError",
    "AccessDeniedError",
    "BackendBusyError",
    "ConnectionLostError",
    "DeviceNotFoundError",
    "HandshakeError",
    "InvalidAccessError",
    "NotImplementedOpError",
    "OperationFailedError",
    "error_for_code",
    "LspciOptionError",
    "PciIds",
    "filter_devices",
    "format_listing",
    "render_lspci",
]
