"""What firmware does for each guest's virtual bus before the guest looks at it.

When a device is assigned to a guest, :class:`GuestFirmware` sizes its BARs
(from the provider's :class:`~pciback.devices.BarSpec` list and ROM size),
places each one naturally aligned in the guest's windows
(:class:`~shared.pci.WindowAllocator`), writes the addresses into the
guest's virtual BAR registers, sets the Command register's I/O and memory
decode bits where the device has such BARs, and gives the interrupt line a
virtual IRQ (:func:`~shared.pci.virtual_irq`). The guest may re-program any of
it afterwards, through its policy, as it would on real hardware.

A snapshot device may keep its dump's own addresses
(:meth:`pciback.devices.SnapshotDevice.firmware_addresses`): those are
reserved in the allocator rather than placed, so nothing else overlaps them.
A host device's physical addresses never reach the guest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pciback.devices import BarKind, DeviceProvider
from shared.pci import (
    DEFAULT_WINDOWS,
    ROM_RESOURCE,
    Command,
    GuestWindows,
    PciAddress,
    Reg,
    ResourceAssignment,
    ResourceRequest,
    WindowAllocator,
    virtual_irq,
)

__all__ = ["GuestFirmware", "FirmwareSetup", "resource_sizes"]

log = logging.getLogger("pcisplit.firmware")


@dataclass(frozen=True, slots=True)
class FirmwareSetup:
    """What firmware gave one device: its resources and interrupt line."""

    resources: tuple[ResourceAssignment, ...]
    interrupt_line: int | None
    command_bits: int

    def addresses(self) -> dict[int, int]:
        """Resource index -> address, for the resources that got one."""
        return {r.index: r.address for r in self.resources if r.address is not None}


def resource_sizes(provider: DeviceProvider) -> tuple[int, ...]:
    """Sizes of BARs 0-5 and the ROM (index 6), 0 where not implemented."""
    sizes = [0] * (ROM_RESOURCE + 1)
    for spec in provider.bars():
        sizes[spec.index] = spec.size
    sizes[ROM_RESOURCE] = provider.rom_size()
    return tuple(sizes)


def _requests(provider: DeviceProvider) -> list[ResourceRequest]:
    fixed = provider.firmware_addresses()
    requests = [
        ResourceRequest(
            spec.index, spec.size, spec.kind, spec.prefetchable, fixed=fixed.get(spec.index)
        )
        for spec in provider.bars()
    ]
    rom = provider.rom_size()
    if rom:
        requests.append(ResourceRequest(ROM_RESOURCE, rom, fixed=fixed.get(ROM_RESOURCE)))
    return requests


class GuestFirmware:
    """Resource assignment for one guest's virtual bus (one allocator per guest)."""

    def __init__(self, guest: str, windows: GuestWindows = DEFAULT_WINDOWS) -> None:
        self.guest = guest
        self.allocator = WindowAllocator(windows)

    def setup(self, device_id: str, provider: DeviceProvider, address: PciAddress) -> FirmwareSetup:
        """Assign ``provider``'s resources; returns what to program (see :meth:`apply`)."""
        fixed = provider.firmware_addresses()
        resources = tuple(self.allocator.allocate(device_id, _requests(provider)))
        command = 0
        for resource in resources:
            if resource.address is None:
                log.warning(
                    "guest %s device %s: no room for %s %d (%#x bytes) in the windows %s; "
                    "left unassigned",
                    self.guest, device_id, "ROM" if resource.index == ROM_RESOURCE else "BAR",
                    resource.index, resource.size, self.allocator.windows,
                )
            elif resource.index != ROM_RESOURCE and resource.index not in fixed:
                # A kept (dump) address keeps the dump's decode bits too: both are its state.
                command |= Command.IO if resource.kind is BarKind.IO else Command.MEMORY
        pin = provider.config_read(Reg.INTERRUPT_PIN, 1)
        line = virtual_irq(address.device, pin) if 1 <= pin <= 4 else None
        return FirmwareSetup(resources, line, int(command))

    def release(self, device_id: str) -> None:
        """Free the device's ranges when it leaves the bus."""
        self.allocator.release(device_id)
