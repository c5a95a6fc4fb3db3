"""A fake host: a ``/sys/bus/pci/devices`` tree in a directory of the test's own.

A backend whose config says ``sysfs_root = "<FakeHost.root>"`` serves
``kind = "host"`` devices from these files instead of this machine's devices:
a test can let a guest write to a writable host device and read back what
reached the device, and what reset on release put back.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FakeHost"]


class FakeHost:
    """A fake sysfs PCI devices directory at ``root`` (created on the first :meth:`add`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(
        self,
        address: str,
        vendor: int,
        device: int,
        klass: int,
        *,
        attributes: bool = False,
        driver: str | None = None,
        resource: str = "",
    ) -> bytes:
        """Add function ``address`` (``DDDD:BB:DD.F``); returns its 256-byte config image.

        Like sysfs, the function gets a ``config`` file (the IDs, class code and
        revision 01, the rest zero) and a ``resource`` file (``resource``: empty
        unless given); with
        ``attributes`` also ``vendor``, ``device`` and ``class`` files; with
        ``driver`` a ``driver`` link into a ``drivers`` directory beside ``root``.
        """
        path = self.root / address
        path.mkdir(parents=True)
        image = bytearray(256)
        image[0:4] = (device << 16 | vendor).to_bytes(4, "little")
        image[8:12] = (klass << 8 | 0x01).to_bytes(4, "little")
        (path / "config").write_bytes(bytes(image))
        (path / "resource").write_text(resource)
        if attributes:
            (path / "vendor").write_text(f"0x{vendor:04x}\n")
            (path / "device").write_text(f"0x{device:04x}\n")
            (path / "class").write_text(f"0x{klass:06x}\n")
        if driver is not None:
            drivers = self.root.parent / "drivers" / driver
            drivers.mkdir(parents=True, exist_ok=True)
            (path / "driver").symlink_to(drivers)
        return bytes(image)

    def config(self, address: str) -> Path:
        """The ``config`` file of function ``address``: what the backend reads and writes."""
        return self.root / address / "config"
