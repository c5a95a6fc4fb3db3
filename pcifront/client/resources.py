"""A device's resources as the guest sees them, and guest-physical address routing.

Firmware-like assignment (``pciback.plane.firmware``) gives every BAR an address in
the guest's windows; the guest may re-program them. :func:`read_resources`
reads the BAR registers the guest currently sees and pairs them with the BAR
sizes the backend reported (:attr:`pcifront.Device.bar_sizes`), which is what
sysfs ``resource`` shows and what :meth:`pcifront.Bus.mmio_read` routes by.

Routing works as a root complex does: an access goes to the BAR whose range
contains it, if the function's Command register enables that decode (memory
for memory BARs, I/O for I/O BARs). An access nobody decodes raises
:class:`UnclaimedAddressError` instead of returning all ones silently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from shared.errors import ErrorCode, PcisplitError
from shared.pci import (
    BAR_IO_ADDRESS_MASK,
    BAR_MEM_ADDRESS_MASK,
    ROM_ADDRESS_MASK,
    ROM_ENABLE,
    BarFlag,
    Command,
    Reg,
    bar_count,
)

__all__ = ["Resource", "UnclaimedAddressError", "read_resources", "route"]

#: Resource index of the expansion ROM (sysfs ``resource`` line 6).
ROM_INDEX: Final = 6
# sysfs resource flags (include/linux/ioport.h), so lspci reads them like the kernel's.
_IORESOURCE_IO: Final = 0x100
_IORESOURCE_MEM: Final = 0x200
_IORESOURCE_PREFETCH: Final = 0x2000
_IORESOURCE_MEM_64: Final = 0x100000
_IORESOURCE_READONLY: Final = 0x4000
_IORESOURCE_ROM_ENABLE: Final = 0x1
_ACCESS_SIZES: Final = (1, 2, 4, 8)


class UnclaimedAddressError(PcisplitError):
    """No function on the guest's bus decodes the address (a master abort on hardware)."""

    code = ErrorCode.NOT_FOUND


@dataclass(frozen=True, slots=True)
class Resource:
    """One BAR (index 0-5) or the expansion ROM (6) as the guest sees it now."""

    index: int
    start: int
    size: int
    io: bool
    prefetchable: bool = False
    is_64bit: bool = False
    enabled: bool = True  # the ROM's enable bit; always True for BARs

    @property
    def end(self) -> int:
        """The last address (inclusive), as sysfs prints it."""
        return self.start + self.size - 1

    @property
    def sysfs_flags(self) -> int:
        """The flags column of sysfs ``resource`` (what lspci reads the kind from)."""
        if self.io:
            return _IORESOURCE_IO
        flags = _IORESOURCE_MEM
        if self.prefetchable:
            flags |= _IORESOURCE_PREFETCH
        if self.is_64bit:
            flags |= _IORESOURCE_MEM_64
        if self.index == ROM_INDEX:
            flags |= _IORESOURCE_READONLY | _IORESOURCE_PREFETCH
            if self.enabled:
                flags |= _IORESOURCE_ROM_ENABLE
        return flags

    def contains(self, address: int, size: int) -> bool:
        return self.start <= address and address + size <= self.start + self.size


class ConfigSpace(Protocol):
    """What reading a device's resources needs of it (a :class:`~pcifront.Device`)."""

    @property
    def bar_sizes(self) -> tuple[int, ...]: ...

    async def config_read(self, offset: int, size: int) -> int: ...


D = TypeVar("D")


def resources_from_image(config: bytes, sizes: tuple[int, ...]) -> list[Resource]:
    """The resources a config image programs, given the BAR sizes (0: not implemented)."""

    def dword(offset: int) -> int:
        return int.from_bytes(config[offset : offset + 4], "little")

    if len(sizes) != ROM_INDEX + 1:
        return []
    header = config[Reg.HEADER_TYPE] & 0x7F
    count = bar_count(header)
    found: list[Resource] = []
    index = 0
    while index < count:
        low = dword(Reg.BAR0 + 4 * index)
        size = sizes[index]
        if low & BarFlag.IO_SPACE:
            if size:
                found.append(Resource(index, low & BAR_IO_ADDRESS_MASK, size, io=True))
            index += 1
            continue
        is_64 = low & 0x6 == 0x4
        start = low & BAR_MEM_ADDRESS_MASK
        if is_64 and index + 1 < count:
            start |= dword(Reg.BAR0 + 4 * index + 4) << 32
        if size:
            found.append(
                Resource(index, start, size, io=False, prefetchable=bool(low & 0x8), is_64bit=is_64)
            )
        index += 2 if is_64 else 1
    rom_size = sizes[ROM_INDEX]
    if rom_size and header in (0, 1):
        value = dword(Reg.ROM_ADDRESS if header == 0 else 0x38)
        found.append(
            Resource(
                ROM_INDEX, value & ROM_ADDRESS_MASK, rom_size, io=False,
                enabled=bool(value & ROM_ENABLE),
            )
        )
    return found


async def read_resources(device: ConfigSpace) -> list[Resource]:
    """Read the device's BAR registers now and return its resources (see module doc)."""
    sizes = device.bar_sizes
    if not any(sizes):
        return []
    header = await device.config_read(Reg.HEADER_TYPE, 1)
    image = bytearray(0x40)
    image[Reg.HEADER_TYPE] = header
    end = Reg.BAR0 + 4 * bar_count(header)
    for offset in range(Reg.BAR0, end, 4):
        image[offset : offset + 4] = (await device.config_read(offset, 4)).to_bytes(4, "little")
    if sizes[ROM_INDEX] and header & 0x7F in (0, 1):
        rom = Reg.ROM_ADDRESS if header & 0x7F == 0 else 0x38
        image[rom : rom + 4] = (await device.config_read(rom, 4)).to_bytes(4, "little")
    return resources_from_image(bytes(image), sizes)


async def route(
    devices: Sequence[D],
    decoded: Callable[[D], Awaitable[DecodedResources]],
    guest: str,
    address: int,
    size: int,
    *,
    io: bool,
) -> tuple[D, Resource]:
    """The device of ``devices`` and its BAR that decode ``size`` bytes at ``address``.

    ``decoded(device)`` gives a device's resources with its Command register
    (cached by the device); ``guest`` names the bus in the error (see module doc).
    """
    if size not in _ACCESS_SIZES:
        raise UnclaimedAddressError(
            f"access size {size} is invalid; use 1, 2, 4 or 8", code=ErrorCode.INVALID_SIZE
        )
    if address < 0 or address % size:
        raise UnclaimedAddressError(
            f"address {address:#x} is not aligned to the {size}-byte access",
            code=ErrorCode.INVALID_OFFSET,
        )
    decode_bit = Command.IO if io else Command.MEMORY
    for device in devices:
        windows = await decoded(device)
        for resource in windows:
            if resource.io != io or resource.index == ROM_INDEX:
                continue
            if resource.contains(address, size) and windows.command & decode_bit:
                return device, resource
    space = "I/O port" if io else "memory address"
    raise UnclaimedAddressError(
        f"no device on guest {guest!r}'s bus decodes the {space} {address:#x} "
        f"({size} bytes): no BAR covers it, or its device has {'I/O' if io else 'memory'} "
        "decode off in Command"
    )


class DecodedResources(list[Resource]):
    """A device's resources with the Command register they were read with."""

    def __init__(self, resources: list[Resource], command: int) -> None:
        super().__init__(resources)
        self.command = command


async def decode_device(device: ConfigSpace) -> DecodedResources:
    """Read a device's resources and Command register (cached by the device)."""
    resources = await read_resources(device)
    command = await device.config_read(Reg.COMMAND, 2)
    return DecodedResources(resources, command)
