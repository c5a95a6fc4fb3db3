"""What the trio and the blocking ``Device`` share: the identity read from the snapshot."""

from __future__ import annotations

from shared.pci import PciAddress
from shared.protocol import DeviceInfo

__all__ = ["DeviceView"]


class DeviceView:
    """One function on the guest's virtual bus, as the last snapshot described it."""

    def __init__(self, info: DeviceInfo) -> None:
        self._packed = info.address
        self.pci_address = PciAddress.unpack(info.address)
        self.info = info

    @property
    def address(self) -> str:
        """``DDDD:BB:DD.F`` on the virtual bus, e.g. ``0000:00:00.0``."""
        return str(self.pci_address)

    @property
    def vendor_id(self) -> int:
        return self.info.vendor_id

    @property
    def device_id(self) -> int:
        return self.info.device_id

    @property
    def class_code(self) -> int:
        """24 bits: base class, subclass, programming interface."""
        return self.info.class_code

    @property
    def revision(self) -> int:
        return self.info.revision

    @property
    def config(self) -> bytes | None:
        """The config image from the last snapshot taken with ``include_config``."""
        return self.info.config

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.address} {self.vendor_id:04x}:{self.device_id:04x} "
            f"class {self.class_code:06x}>"
        )
