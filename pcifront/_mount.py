"""The sysfs mirror's Python API under its earlier import path.

Earlier versions documented ``pcifront._mount.mounted(bus, DIR)``; the mirror
now lives in :mod:`pcifront.tools.mount`, and this name keeps old code working.
"""

from pcifront.tools.mount import DRIVER_NAME, GuestFs, MountError, check_mountpoint, mounted

__all__ = ["GuestFs", "MountError", "mounted", "check_mountpoint", "DRIVER_NAME"]
