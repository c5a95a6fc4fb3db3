"""What the trio and the blocking client share: a ``Device``'s identity read from the
snapshot, and a ``Bus``'s accessors that need no I/O."""

from __future__ import annotations

from typing import Generic, TypeVar

from pcifront.core.dma import DmaSpace
from pcifront.core.errors import error_for_code
from pcifront.core.routes import BusStatistics
from pcifront.core.session import ClientCore
from shared.errors import ErrorCode
from shared.pci import PciAddress
from shared.protocol import DeviceInfo

__all__ = ["BusView", "DeviceView"]


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


D = TypeVar("D", bound=DeviceView)


class BusView(Generic[D]):
    """The accessors of a connected guest's bus that both clients share.

    Subclasses set ``_dma``, ``stats`` and ``devices``, and say which
    :class:`ClientCore` is the current connection's (:meth:`_current_core`).
    """

    _dma: DmaSpace
    stats: BusStatistics
    devices: list[D]

    def _current_core(self) -> ClientCore:
        raise NotImplementedError

    @property
    def guest(self) -> str:
        return self._current_core().guest

    @property
    def features(self) -> tuple[str, ...]:
        """The optional features both sides support (``"interrupts"``, ``"dma"``...)."""
        return self._current_core().features

    def statistics(self) -> BusStatistics:
        stats = self.stats
        stats.dma_calls_answered = self._dma.calls_answered
        stats.dma_calls_faulted = self._dma.calls_faulted
        return stats

    def device(self, address: str | PciAddress) -> D:
        """The device at ``address`` (``0000:00:01.0`` or ``00:01.0``)."""
        wanted = address if isinstance(address, PciAddress) else PciAddress.parse(address)
        for dev in self.devices:
            if dev.pci_address == wanted:
                return dev
        raise error_for_code(ErrorCode.NOT_FOUND, f"no device at {wanted} on this bus")
