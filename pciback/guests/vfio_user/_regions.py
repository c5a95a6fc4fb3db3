"""The regions a vfio-user client sees of one served device, and how its accesses are split.

The config region (index 7) is the guest's view through the device's policy;
regions 0-5 are its BARs and 6 its expansion ROM, with the sizes the provider
declares; the VGA region (8) is never implemented. A client may read or write
any number of bytes at any offset inside a region: :func:`pieces` splits
that into the naturally aligned 1-, 2- and 4-byte accesses that the policy
and the device models take.
"""

from __future__ import annotations

from collections.abc import Iterator

from shared.protocol import vfio_user as vu

__all__ = ["CONFIG", "ROM", "region_info", "pieces", "region_size"]

CONFIG = vu.PCI_CONFIG_REGION
ROM = vu.PCI_ROM_REGION
_RW = vu.REGION_FLAG_READ | vu.REGION_FLAG_WRITE


def region_size(index: int, config_size: int, resources: tuple[int, ...]) -> int:
    """Bytes in region ``index`` (0: not implemented). ``resources``: BARs 0-5 and the ROM."""
    if index == CONFIG:
        return config_size
    if 0 <= index <= ROM and index < len(resources):
        return resources[index]
    return 0


def region_info(index: int, config_size: int, resources: tuple[int, ...]) -> vu.RegionInfo:
    """The DEVICE_GET_REGION_INFO reply for ``index`` (size 0 and no flags: not implemented)."""
    size = region_size(index, config_size, resources)
    if size == 0:
        return vu.RegionInfo(index, 0, 0)
    flags = vu.REGION_FLAG_READ if index == ROM else _RW
    return vu.RegionInfo(index, flags, size)


def pieces(offset: int, count: int, widest: int = 4) -> Iterator[tuple[int, int]]:
    """``(offset, size)`` of naturally aligned accesses of at most ``widest`` bytes."""
    end = offset + count
    while offset < end:
        size = widest
        while size > 1 and (offset % size or offset + size > end):
            size >>= 1
        yield offset, size
        offset += size
