"""Event channels: ports with notify, wait, mask/unmask and a coalescing pending bit.

Used as the shared ring's doorbells and (next issue) for interrupts.
"""

from shared.evtchn._eventfd import EventfdPort
from shared.evtchn._guard import GUARD_SECONDS, EventfdStalledError
from shared.evtchn._port import InbandPort, InMemoryPort, Port, PortStatistics

__all__ = [
    "Port",
    "PortStatistics",
    "EventfdPort",
    "EventfdStalledError",
    "GUARD_SECONDS",
    "InMemoryPort",
    "InbandPort",
]
