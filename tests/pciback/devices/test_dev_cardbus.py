"""CardBus bridges (header type 2) served as snapshots (issue 10 §1)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pcifront
from pciback.devices import DeviceSetupError, SnapshotDevice
from pciback.testing import running_backend
from shared.pci import CapId, DumpEntry, PciAddress, format_dump, walk_capabilities


def cardbus_image(size: int = 256) -> bytes:
    """A TI PCI1420-like CardBus bridge: socket BAR, PM capability at 0xa0 via 0x14."""
    data = bytearray(size)
    data[0:4] = bytes.fromhex("4c1051ac")  # 104c:ac51
    data[0x04:0x08] = bytes.fromhex("07001002")  # I/O+ Mem+ Master+, status: cap list
    data[0x08:0x0C] = bytes.fromhex("00000706")  # class 0607 (CardBus bridge)
    data[0x0C:0x10] = bytes.fromhex("08a88200")  # cache line, latency, header type 0x82
    data[0x10:0x14] = (0xFEBFF000).to_bytes(4, "little")  # BAR0: 4 KiB socket registers
    data[0x18:0x1C] = bytes.fromhex("020305b0")  # PCI bus 2, CardBus bus 3, subordinate 5
    data[0x1C:0x20] = (0xF4000000).to_bytes(4, "little")  # memory window 0
    data[0x20:0x24] = (0xF7FFF000).to_bytes(4, "little")
    data[0x2C:0x30] = (0x4000).to_bytes(4, "little")  # I/O window 0
    data[0x30:0x34] = (0x40FC).to_bytes(4, "little")
    data[0x3C:0x40] = bytes.fromhex("0b014005")  # line, pin INTA, bridge control
    data[0x40:0x44] = bytes.fromhex("2810ab01")  # subsystem 1028:01ab
    data[0x44:0x48] = (0x0001).to_bytes(4, "little")  # legacy-mode base
    if size > 0x80:
        data[0x14] = 0xA0
        data[0xA0:0xA4] = bytes.fromhex("0100 11fe".replace(" ", ""))  # PM cap v2
    return bytes(data)


def _dump(image: bytes) -> str:
    return format_dump([DumpEntry("02:01.0 CardBus bridge: TI PCI1420", PciAddress(0, 2, 1, 0),
                                  image)])


def test_cardbus_snapshot_from_a_128_byte_dump() -> None:
    dev = SnapshotDevice.from_dump(_dump(cardbus_image(128)))
    assert dev.header_type == 0x82
    (bar,) = dev.bars()
    assert (bar.index, bar.size) == (0, 0x1000)
    assert dev.rom_size() == 0
    assert dev.firmware_addresses() == {0: 0xFEBFF000}
    # Sizing works like hardware on the one BAR.
    dev.config_write(0x10, 4, 0xFFFFFFFF)
    assert dev.config_read(0x10, 4) == 0xFFFFF000
    # The subsystem IDs in the CardBus header are read-only.
    dev.config_write(0x40, 4, 0)
    assert dev.config_read(0x40, 4) == 0x01AB1028
    with pytest.raises(DeviceSetupError, match="CardBus"):
        SnapshotDevice(cardbus_image(), bar_sizes={6: 0x10000})


async def test_cardbus_bridge_served_with_policy(tmp_path: Path) -> None:
    dump = tmp_path / "cardbus.txt"
    dump.write_text(_dump(cardbus_image()))
    config = (
        "[[guest]]\nname = 'guest0'\n"
        f"[[device]]\nid = 'cb'\nkind = 'snapshot'\ndump = '{dump}'\nguest = 'guest0'\n"
        "bar_sizes = { 0 = 0x1000 }\n"
    )
    async with (
        running_backend(config, tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory"), include_config=True) as bus,
    ):
        (cb,) = bus.devices
        assert cb.config is not None and cb.config[0x0E] == 0x82
        assert cb.bar_sizes == (0x1000, 0, 0, 0, 0, 0, 0)
        (res,) = await cb.resources()
        assert res.start != 0xFEBFF000 and res.start % 0x1000 == 0  # firmware placed it
        # The capability list starts at 0x14 and is walked like any other.
        caps = walk_capabilities(cb.config)
        assert [cap.id for cap in caps] == [CapId.PM]
        # Bridge windows and bus numbers are read-only to the guest.
        for offset, size in ((0x1C, 4), (0x2C, 4), (0x18, 1), (0x3E, 2), (0x44, 4)):
            before = await cb.config_read(offset, size)
            with pytest.raises(pcifront.AccessDeniedError):
                await cb.config_write(offset, size, 0)
            assert await cb.config_read(offset, size) == before
        # The Command decode bits and the BAR remain the guest's.
        await cb.config_write(0x10, 4, 0xFFFFFFFF)
        assert await cb.config_read(0x10, 4) == 0xFFFFF000
        await cb.config_write(0x10, 4, 0xE000_0000)
        assert await cb.config_read(0x10, 4) == 0xE000_0000
