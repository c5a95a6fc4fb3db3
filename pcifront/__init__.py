"""pcifront: the guest agent. Presents the backend's devices as a virtual PCI bus.

    async with pcifront.connect("unix:./pciback.sock", guest="guest0") as bus:
        dev = bus.devices[0]
        vendor = await dev.config_read(0, 2)
        async with dev.interrupts(mode="msi", vectors=1) as irqs:
            irq = await irqs.receive()
            await irqs.eoi(irq)
        async with await bus.dma_map(4096) as buf:
            buf.write(0, b"data for the device")
        async for change in bus.changes():  # hot-plug: ChangeKind.ADDED / REMOVED
            print(change.kind, change.device)
"""

from pcifront import blocking
from pcifront.client.bus import FRONTEND_FEATURES, Bus, BusStatistics, Device, connect
from pcifront.client.changes import ChangeKind, ChangesOverflowError, DeviceChange, DeviceChanges
from pcifront.client.dma import DmaBuffer, DmaError
from pcifront.client.interrupts import Interrupts
from pcifront.client.reconnect import LinkEvent, ReconnectPolicy
from pcifront.client.resources import Resource, UnclaimedAddressError
from pcifront.core.errors import (
    AccessDeniedError,
    BackendBusyError,
    ConnectionLostError,
    DeviceNotFoundError,
    DeviceRemovedError,
    HandshakeError,
    InvalidAccessError,
    NotImplementedOpError,
    OperationFailedError,
    OutcomeUnknownError,
    RequestError,
    ResourceLostError,
    error_for_code,
)
from pcifront.core.vectors import Interrupt, InterruptModeError, InterruptStatistics
from pcifront.tools.legacy import Ecam, LegacyAccessError, PortIO, PortIOSession
from pcifront.tools.lspci import LspciOptionError, filter_devices, format_listing, render_lspci
from pcifront.tools.pciids import PciIds
from shared.cli import package_version
from shared.errors import ErrorCode

#: The installed pcisplit version (from the package metadata).
__version__ = package_version()

__all__ = [
    "__version__",
    "connect",
    "blocking",
    "Bus",
    "Device",
    "BusStatistics",
    "FRONTEND_FEATURES",
    "ChangeKind",
    "DeviceChange",
    "DeviceChanges",
    "ChangesOverflowError",
    "ReconnectPolicy",
    "LinkEvent",
    "Interrupt",
    "Interrupts",
    "InterruptStatistics",
    "InterruptModeError",
    "DmaBuffer",
    "DmaError",
    "ErrorCode",
    "RequestError",
    "AccessDeniedError",
    "BackendBusyError",
    "ConnectionLostError",
    "DeviceNotFoundError",
    "DeviceRemovedError",
    "HandshakeError",
    "InvalidAccessError",
    "NotImplementedOpError",
    "OperationFailedError",
    "OutcomeUnknownError",
    "ResourceLostError",
    "error_for_code",
    "LspciOptionError",
    "PciIds",
    "Resource",
    "PortIO",
    "PortIOSession",
    "Ecam",
    "LegacyAccessError",
    "UnclaimedAddressError",
    "filter_devices",
    "format_listing",
    "render_lspci",
]
