"""What operations need of a running backend: the one interface ``ctl`` and reload use.

Operations (the control server, reload, the startup summary) never import
the service. They talk to a backend through :class:`OperatedBackend`, a
:class:`~typing.Protocol` that :class:`pciback.service.Backend` satisfies:
its config, its device registry, what is connected, its counters, the
hot-plug and reset operations, and the methods through which a reload
applies a new configuration. Nothing here is a field to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pciback._ratelog import RateLimitedLog, RateLogStatistics
from pciback.config import BackendConfig, DeviceConfig
from pciback.devices import DeviceProvider
from pciback.plane.hotplug import HotplugResult
from pciback.plane.registry import DeviceRegistry, ServedDevice
from shared.pci import PciAddress

__all__ = ["OperatedBackend", "ConnectionInfo", "Counters"]


@dataclass(frozen=True)
class ConnectionInfo:
    """One connected guest session, as ``ctl status`` shows it."""

    guest: str
    number: int
    transport: str
    requests: int
    fds_held: int


class Counters(Protocol):
    """The backend's counters (``ctl status`` shows them as they are)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        ...


class OperatedBackend(Protocol):
    """A running backend, as operations see it (:class:`pciback.service.Backend`)."""

    @property
    def config(self) -> BackendConfig:
        """The running configuration (replaced only by :meth:`adopt_config`)."""
        ...

    @property
    def registry(self) -> DeviceRegistry:
        """Every served device, who has it and its state."""
        ...

    @property
    def control_path(self) -> Path | None:
        """The control socket's path, or None without one."""
        ...

    @property
    def control_log(self) -> RateLimitedLog:
        """The rate-limited log of lines control clients cause."""
        ...

    @property
    def started_at(self) -> float | None:
        """``trio.current_time()`` when serving began (None before)."""
        ...

    @property
    def forced_removals(self) -> int:
        """Hot-unplugs completed without every acknowledgement."""
        ...

    @property
    def reset_failures(self) -> int:
        """Device resets that failed."""
        ...

    def bound_addresses(self) -> list[str]:
        """The addresses the backend listens on, as bound."""
        ...

    def connections(self) -> list[ConnectionInfo]:
        """Every connected guest session."""
        ...

    def connection_count(self, guest: str) -> int:
        """How many sessions ``guest`` has connected."""
        ...

    def statistics(self) -> Counters:
        """The backend's counters."""
        ...

    def log_statistics(self) -> RateLogStatistics:
        """Guest-triggered log events by kind, logged and suppressed."""
        ...

    async def assign(self, device_id: str, guest: str) -> HotplugResult:
        """Hot-plug ``device_id`` into ``guest``."""
        ...

    async def unassign(
        self, device_id: str, *, reason: str = "unassigned by the operator"
    ) -> HotplugResult:
        """Hot-unplug ``device_id`` from its guest (reset once acknowledged or timed out)."""
        ...

    async def reset_device(self, dev: ServedDevice, why: str) -> bool:
        """Reset one device; True when the reset succeeded."""
        ...

    def adopt_config(self, new: BackendConfig) -> None:
        """Make ``new`` the running configuration (a reload's first step)."""
        ...

    def remove_device(self, device_id: str) -> ServedDevice:
        """Stop serving a free device; returns it (its provider is not closed)."""
        ...

    def add_device(
        self, config: DeviceConfig, provider: DeviceProvider, physical: PciAddress | None
    ) -> ServedDevice:
        """Serve a new device (free; assign it with :meth:`assign`)."""
        ...

    def record_host_state(self, *, devices_changed: bool) -> None:
        """Record the writable host devices' saved config in the state file, if one is kept."""
        ...
