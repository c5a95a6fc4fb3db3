"""Fuzz target: the policy engine's access path (``PolicedDevice.config_read/write``).

The input is a script of guest config accesses (offset, size, value) against
real devices (the edu model and an lspci dump with MSI, MSI-X and PCIe caps).
Only typed pcisplit errors may come out, identity registers never change, and
the device's Command register never gets a bit outside the guest's set (XSA-120).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import instrumented

with instrumented(__name__, ["pciback.policy", "shared.pci"]):
    from pciback.devices import EduDevice, SnapshotDevice
    from pciback.policy import PolicedDevice, PolicyConfig, Preset
    from shared.errors import PcisplitError

DUMP = Path(__file__).resolve().parent.parent / "tests/data/pcidata/eth_intel_82576_sriov.txt"
GUEST_COMMAND_BITS = 0x0007
OP = struct.Struct("<BHI")


def _device(choice: int) -> tuple[PolicedDevice, object]:
    provider = EduDevice() if choice % 2 == 0 else SnapshotDevice.from_dump(DUMP)
    preset = (Preset.DEFAULT, Preset.PERMISSIVE, Preset.TRANSPARENT_READONLY)[choice // 2 % 3]
    return PolicedDevice(provider, PolicyConfig(preset=preset), guest="g", device="d"), provider


def test_one_input(data: bytes) -> None:
    if not data:
        return
    dev, provider = _device(data[0])
    identity = provider.config_read(0, 4)  # type: ignore[attr-defined]
    command = provider.config_read(4, 2)  # type: ignore[attr-defined]
    preset = dev.config.preset
    for i in range(1, len(data) - OP.size + 1, OP.size):
        kind, offset, value = OP.unpack_from(data, i)
        size = (1, 2, 4, 3, 8)[kind % 5]
        offset %= 0x1100  # a little past config space too
        try:
            if kind & 0x80:
                dev.config_read(offset, size)
            else:
                dev.config_write(offset, size, value & ((1 << (8 * min(size, 4))) - 1))
        except PcisplitError:
            continue
        if provider.config_read(0, 4) != identity:  # type: ignore[attr-defined]
            raise AssertionError("a guest write changed the device's vendor/device id")
        now = provider.config_read(4, 2)  # type: ignore[attr-defined]
        if preset is Preset.DEFAULT and (now ^ command) & ~GUEST_COMMAND_BITS:
            raise AssertionError(f"Command went {command:#x} -> {now:#x} (XSA-120)")


if __name__ == "__main__":
    from _common import run

    run(test_one_input)
