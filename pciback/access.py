"""The guest-facing access path of one device: provider behind its config-space policy."""

from __future__ import annotations

from typing import Protocol

from pciback.config import DeviceConfig
from pciback.devices import DeviceProvider
from shared.pci import check_access

__all__ = ["DeviceAccess", "make_access", "DirectAccess"]


class DeviceAccess(Protocol):
    """What the dispatcher calls for a guest's request (all synchronous, under the device lock)."""

    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def bar_read(self, bar: int, offset: int, size: int) -> int: ...
    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...
    def reset(self) -> None: ...
    def config_image(self) -> bytes: ...


class DirectAccess:
    """No policy: the guest reaches the provider as it is (used for trusted test set-ups)."""

    def __init__(self, provider: DeviceProvider) -> None:
        self.provider = provider

    def config_read(self, offset: int, size: int) -> int:
        check_access(offset, size, self.provider.config_size)
        return self.provider.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        check_access(offset, size, self.provider.config_size)
        self.provider.config_write(offset, size, value)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return self.provider.bar_read(bar, offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.provider.bar_write(bar, offset, size, value)

    def reset(self) -> None:
        self.provider.reset()

    def config_image(self) -> bytes:
        return self.provider.config_image()


def make_access(provider: DeviceProvider, cfg: DeviceConfig) -> DeviceAccess:
    """The access path for a configured device."""
    return DirectAccess(provider)
