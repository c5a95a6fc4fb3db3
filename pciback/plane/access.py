"""The guest-facing access path of one device: provider behind its config-space policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pciback.config import DeviceConfig
from pciback.devices import DeviceProvider
from pciback.plane.firmware import FirmwareSetup, resource_sizes
from pciback.policy import AuditLog, PolicedDevice, QuirkConfig
from shared.errors import ConfigFileError, PcisplitError
from shared.pci import Reg

__all__ = ["DeviceAccess", "make_access", "PolicedAccess"]


class DeviceAccess(Protocol):
    """What the dispatcher calls for a guest's request (all synchronous, under the device lock)."""

    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def bar_read(self, bar: int, offset: int, size: int) -> int: ...
    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...
    def reset(self) -> None: ...
    def config_image(self) -> bytes: ...
    def apply_firmware(self, setup: FirmwareSetup) -> None: ...
    def bar_sizes(self) -> tuple[int, ...]: ...


class PolicedAccess:
    """The guest's access path through its config-space policy (``pciback.policy``)."""

    def __init__(self, provider: DeviceProvider, policed: PolicedDevice) -> None:
        self.provider = provider
        self.policed = policed
        self.firmware: FirmwareSetup | None = None

    def config_read(self, offset: int, size: int) -> int:
        return self.policed.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.policed.config_write(offset, size, value)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return self.provider.bar_read(bar, offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.provider.bar_write(bar, offset, size, value)

    def reset(self) -> None:
        """Reset the device; the guest finds it as firmware left it, as after a reboot."""
        self.provider.reset()
        self.policed.reset()
        if self.firmware is not None:
            self._program(self.firmware)

    def config_image(self) -> bytes:
        return self.policed.guest_config_image()

    def apply_firmware(self, setup: FirmwareSetup) -> None:
        """Program what firmware assigned (kept, and programmed again after every reset)."""
        self.firmware = setup
        self._program(setup)

    def bar_sizes(self) -> tuple[int, ...]:
        return resource_sizes(self.provider)

    def _program(self, setup: FirmwareSetup) -> None:
        self.policed.program_firmware(setup.addresses(), interrupt_line=setup.interrupt_line)
        if setup.command_bits:
            # The decode bits are the device's own (they pass through the policy).
            command = self.provider.config_read(Reg.COMMAND, 2)
            if command & setup.command_bits != setup.command_bits:
                self.provider.config_write(Reg.COMMAND, 2, command | setup.command_bits)


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
