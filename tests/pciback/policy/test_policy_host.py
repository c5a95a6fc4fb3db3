"""Every real device of this machine, served read-only through transparent-readonly.

The host devices are opened read-only (``HostDevice(writable=False)`` opens
sysfs ``config`` with O_RDONLY) and ``transparent-readonly`` refuses every
write anyway: nothing here can write to the machine's hardware.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pciback.devices import SYSFS_PCI_DEVICES, BarKind, HostDevice
from pciback.policy import INTERRUPT_LINE_INIT, PolicedDevice, PolicyConfig, Preset

ADDRESSES = (
    sorted(p.name for p in Path(SYSFS_PCI_DEVICES).glob("*"))
    if Path(SYSFS_PCI_DEVICES).is_dir()
    else []
)
VIRTUAL = {
    0: frozenset([*range(0x10, 0x28), *range(0x30, 0x34), 0x3C]),
    1: frozenset([*range(0x10, 0x18), *range(0x38, 0x3C), 0x3C]),
    2: frozenset([*range(0x10, 0x14), 0x3C]),
}


@pytest.mark.skipif(not ADDRESSES, reason="no /sys/bus/pci/devices on this machine")
@pytest.mark.parametrize("address", ADDRESSES)
def test_host_device_reads_back_identical_except_virtual_fields(address: str) -> None:
    with HostDevice(address) as host:
        assert not host.writable
        first = host.config_image()
        dev = PolicedDevice(
            host, PolicyConfig(preset=Preset.TRANSPARENT_READONLY), guest="g", device=address
        )
        image = dev.guest_config_image()
        second = host.config_image()
        specs = host.bars()
    volatile = {i for i in range(len(first)) if first[i] != second[i]}
    virtual = VIRTUAL[first[0x0E] & 0x7F]
    assert len(image) == len(first)
    differing = [
        hex(i)
        for i in range(len(first))
        if i not in virtual and i not in volatile and image[i] != first[i]
    ]
    assert differing == []
    assert image[0x3C] == INTERRUPT_LINE_INIT
    for spec in specs:
        low = int.from_bytes(image[0x10 + 4 * spec.index : 0x14 + 4 * spec.index], "little")
        assert low == spec.flags  # unassigned in the guest's view, flags kept
        if spec.kind is BarKind.MEM64:
            assert image[0x14 + 4 * spec.index : 0x18 + 4 * spec.index] == bytes(4)
