"""The guest's bus as a Linux-sysfs-shaped tree: what ``/sys/bus/pci/devices/X`` holds.

pciutils' ``linux-sysfs`` access method reads ``DIR/devices/DDDD:BB:DD.F/``:
``vendor``, ``device`` and ``class`` are required, ``config`` is needed for
any decoding, ``irq`` and ``resource`` for ``-v`` (``resource`` gives the
``[size=...]`` of each BAR). This module renders those files exactly as the
kernel does (``drivers/pci/pci-sysfs.c``), from a device's config image and
BAR sizes. The FUSE mirror (:mod:`pcifront.tools.mount`) serves them live; the
lspci front-end writes them to a temporary directory (:func:`write_tree`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pcifront.client.resources import ROM_INDEX, Resource, resources_from_image
from shared.errors import PcisplitError
from shared.pci import CapId, PciAddress, Reg, walk_capabilities

__all__ = [
    "ATTRIBUTES",
    "DeviceView",
    "device_files",
    "resource_text",
    "irq_of",
    "write_tree",
]

#: The read-only text attributes of one device directory (besides ``config``).
ATTRIBUTES: Final = (
    "vendor",
    "device",
    "class",
    "revision",
    "subsystem_vendor",
    "subsystem_device",
    "irq",
    "resource",
    "numa_node",
    "enable",
)
# The kernel sets IORESOURCE_SIZEALIGN on every BAR and ROM resource.
_SIZEALIGN: Final = 0x40000
# Resource lines of a sysfs ``resource`` file on x86: six BARs and the ROM.
_RESOURCE_LINES: Final = 7


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device's config image and BAR sizes (what the files are rendered from)."""

    address: PciAddress
    config: bytes
    bar_sizes: tuple[int, ...]


def _word(config: bytes, offset: int, size: int) -> int:
    return int.from_bytes(config[offset : offset + size], "little")


def irq_of(config: bytes) -> int:
    """The ``irq`` attribute: the (virtual) interrupt line, 0 without a routed pin."""
    pin, line = config[Reg.INTERRUPT_PIN], config[Reg.INTERRUPT_LINE]
    return line if pin and line != 0xFF else 0


def _resource_line(resource: Resource | None, raw_flags: int) -> str:
    if resource is None:
        return f"0x{0:016x} 0x{0:016x} 0x{0:016x}\n"
    flags = resource.sysfs_flags | _SIZEALIGN | raw_flags
    return f"0x{resource.start:016x} 0x{resource.end:016x} 0x{flags:016x}\n"


def resource_text(config: bytes, bar_sizes: tuple[int, ...]) -> str:
    """The ``resource`` file: ``start end flags`` per BAR and the ROM, as the kernel prints it."""
    by_index = {r.index: r for r in resources_from_image(config, bar_sizes)}
    lines = []
    for index in range(_RESOURCE_LINES):
        resource = by_index.get(index)
        raw = 0
        if resource is not None and index != ROM_INDEX:
            # The kernel keeps the BAR's own type bits in the low flag bits.
            low = _word(config, Reg.BAR0 + 4 * index, 4)
            raw = low & (0x3 if resource.io else 0xF)
        lines.append(_resource_line(resource, raw))
    return "".join(lines)


def _subsystem(config: bytes) -> tuple[int, int]:
    """Subsystem IDs as the kernel finds them: in the header, or a bridge's SSVID capability."""
    layout = config[Reg.HEADER_TYPE] & 0x7F
    if layout == 0:
        return _word(config, 0x2C, 2), _word(config, 0x2E, 2)
    if layout == 2 and len(config) >= 0x44:
        return _word(config, 0x40, 2), _word(config, 0x42, 2)
    if layout == 1 and len(config) > 0x40:
        try:
            ssvid = walk_capabilities(config).find(CapId.SSVID)
        except PcisplitError:
            return 0, 0
        if ssvid is not None:
            return _word(config, ssvid.offset + 4, 2), _word(config, ssvid.offset + 6, 2)
    return 0, 0


def device_files(view: DeviceView) -> dict[str, bytes]:
    """Every text attribute of one device directory, rendered as the kernel does."""
    config = view.config
    sub_vendor, sub_device = _subsystem(config)
    class_code = _word(config, Reg.REVISION_ID, 4) >> 8
    texts = {
        "vendor": f"0x{_word(config, 0, 2):04x}\n",
        "device": f"0x{_word(config, 2, 2):04x}\n",
        "class": f"0x{class_code:06x}\n",
        "revision": f"0x{config[Reg.REVISION_ID]:02x}\n",
        "subsystem_vendor": f"0x{sub_vendor:04x}\n",
        "subsystem_device": f"0x{sub_device:04x}\n",
        "irq": f"{irq_of(config)}\n",
        "resource": resource_text(config, view.bar_sizes),
        "numa_node": "-1\n",
        "enable": "1\n",
    }
    return {name: text.encode() for name, text in texts.items()}


def write_tree(root: Path, views: list[DeviceView]) -> Path:
    """Write ``root/devices/<address>/`` for every view; returns ``root`` (for sysfs.path)."""
    devices = root / "devices"
    devices.mkdir(parents=True, exist_ok=True)
    for view in views:
        directory = devices / str(view.address)
        directory.mkdir()
        (directory / "config").write_bytes(view.config)
        for name, data in device_files(view).items():
            (directory / name).write_bytes(data)
    return root
