"""Device providers: what the backend serves to guests.

- :class:`EmulatedDevice`, the framework for device models written in Python,
  and :class:`EduDevice`, QEMU's ``edu`` device built on it;
- :class:`SnapshotDevice`, a copy of real hardware loaded from an lspci dump;
- :class:`HostDevice`, a real device's config space read through sysfs;
- :class:`VfioUserDevice`, a device imported from a vfio-user server, through
  the raw :class:`VfioUserClient`.

All implement the :class:`DeviceProvider` contract. See ``docs/devices.md``.
"""

from pciback.devices._base import (
    BarKind,
    BarSpec,
    DeviceContext,
    DeviceProvider,
    DeviceSetupError,
    DmaFaultError,
    DmaUnavailableError,
    InterruptSink,
    NullInterruptSink,
)
from pciback.devices._edu import EduDevice, edu_factorial
from pciback.devices._emulated import EmulatedDevice
from pciback.devices._host import SYSFS_PCI_DEVICES, HostDevice, parse_resource_file
from pciback.devices._irqstate import (
    STATE_FIELDS,
    InterruptState,
    InterruptStateError,
    MsiRegisters,
    MsixRegisters,
    Signal,
)
from pciback.devices._plugins import import_model, load_plugin
from pciback.devices._regions import (
    BarRegion,
    HandlerRegion,
    MemoryRegion,
    ReadHandler,
    WriteHandler,
)
from pciback.devices._snapshot import ROM_BAR_INDEX, SnapshotDevice, default_bar_size
from pciback.devices._vfio_user import VfioUserDevice
from pciback.devices._vfio_user_client import (
    VfioUserClient,
    VfioUserErrnoError,
    VfioUserServerError,
    VfioUserServerLost,
)

__all__ = [
    # the contract
    "DeviceProvider",
    "DeviceContext",
    "BarSpec",
    "BarKind",
    "InterruptSink",
    "NullInterruptSink",
    "DeviceSetupError",
    "DmaUnavailableError",
    "DmaFaultError",
    # interrupt state
    "InterruptState",
    "InterruptStateError",
    "Signal",
    "STATE_FIELDS",
    "MsiRegisters",
    "MsixRegisters",
    # emulated devices
    "EmulatedDevice",
    "BarRegion",
    "HandlerRegion",
    "MemoryRegion",
    "ReadHandler",
    "WriteHandler",
    "EduDevice",
    "edu_factorial",
    # snapshots
    "SnapshotDevice",
    "default_bar_size",
    "ROM_BAR_INDEX",
    # host devices
    "HostDevice",
    "parse_resource_file",
    "SYSFS_PCI_DEVICES",
    # vfio-user servers
    "VfioUserDevice",
    "VfioUserClient",
    "VfioUserServerError",
    "VfioUserErrnoError",
    "VfioUserServerLost",
    # models from the user's own code
    "import_model",
    "load_plugin",
]
