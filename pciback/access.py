"""The guest-facing access path of one device: provider behind its config-space policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pciback.config import DeviceConfig
from pciback.devices import DeviceProvider
from pciback.policy import AuditLog, PolicedDevice, QuirkConfig
from shared.errors import ConfigFileError, PcisplitError

__all__ = ["DeviceAccess", "make_access", "PolicedAccess"]


class DeviceAccess(Protocol):
    """What the dispatcher calls for a guest's request (all synchronous, under the device lock)."""

    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def bar_read(self, bar: int, offset: int, size: int) -> int: ...
    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...
    def reset(self) -> None: ...
    def config_image(self) -> bytes: ...


class PolicedAccess:
    """The guest's access path through its config-space policy (``pciback.policy``)."""

    def __init__(self, provider: DeviceProvider, policed: PolicedDevice) -> None:
        self.provider = provider
        self.policed = policed

    def config_read(self, offset: int, size: int) -> int:
        return self.policed.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.policed.config_write(offset, size, value)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return self.provider.bar_read(bar, offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.provider.bar_write(bar, offset, size, value)

    def reset(self) -> None:
        self.provider.reset()
        self.policed.reset()

    def config_image(self) -> bytes:
        return self.policed.guest_config_image()


def make_access(
    provider: DeviceProvider,
    cfg: DeviceConfig,
    *,
    guest: str,
    quirks: Sequence[QuirkConfig],
    audit: AuditLog,
) -> DeviceAccess:
    """The access path of a configured device assigned to ``guest``: always through its policy."""
    try:
        policed = PolicedDevice(
            provider, cfg.policy, guest=guest, device=cfg.id, quirks=quirks, audit=audit
        )
    except ConfigFileError:
        raise
    except PcisplitError as exc:
        raise ConfigFileError(f"{cfg.where} ({cfg.id}): invalid policy: {exc}") from exc
    return PolicedAccess(provider, policed)
