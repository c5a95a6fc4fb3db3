"""The vfio-user front door: a device served over vfio-user on its own socket.

A second kind of guest connection beside pcisplit's own protocol, on the same
device plane (the registry's devices, their policy and models, their locks and
reset). See ``docs/vfio-user.md``.
"""

from pciback.guests.vfio_user._door import VfioUserDoor, open_doors
from pciback.guests.vfio_user._errors import ClientStalledError, CommandRefusedError
from pciback.guests.vfio_user._regions import pieces, region_info
from pciback.guests.vfio_user._session import SEND_TIMEOUT, VfioUserSession, VfioUserStatistics

__all__ = [
    "VfioUserDoor",
    "open_doors",
    "VfioUserSession",
    "VfioUserStatistics",
    "ClientStalledError",
    "CommandRefusedError",
    "SEND_TIMEOUT",
    "pieces",
    "region_info",
]
