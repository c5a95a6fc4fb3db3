"""Firmware-like BAR assignment at assignment time, and guest-physical routing (issue 10 §1)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pcifront
from pciback.testing import running_backend
from shared.pci import DEFAULT_WINDOWS, Command, parse_dump, virtual_irq

DATA = Path(__file__).resolve().parents[1] / "data" / "pcidata"
EDU_ID = 0x010000ED


def _config(*devices: str) -> str:
    return "[[guest]]\nname = 'guest0'\n" + "".join(devices)


EDU = "[[device]]\nid = 'edu'\nkind = 'emulated'\nmodel = 'edu'\nguest = 'guest0'\n"


def _snapshot(name: str, dev_id: str, sizes: str = "") -> str:
    text = (
        f"[[device]]\nid = '{dev_id}'\nkind = 'snapshot'\ndump = '{DATA / name}.txt'\n"
        "guest = 'guest0'\n"
    )
    return text + (f"bar_sizes = {{ {sizes} }}\n" if sizes else "")


async def test_edu_gets_an_aligned_address_decode_and_irq(tmp_path: Path) -> None:
    async with (
        running_backend(_config(EDU, EDU.replace("'edu'\nkind", "'edu2'\nkind")), tmp=tmp_path)
        as rb,
        pcifront.connect(rb.address("memory")) as bus,
    ):
        first, second = bus.devices
        starts = []
        for dev in (first, second):
            bar0 = await dev.config_read(0x10, 4)
            start = bar0 & ~0xF
            window = DEFAULT_WINDOWS.mmio32
            assert window.base <= start < window.end and start % 0x100000 == 0
            assert await dev.config_read(0x04, 2) & Command.MEMORY
            pin = await dev.config_read(0x3D, 1)
            assert await dev.config_read(0x3C, 1) == virtual_irq(dev.pci_address.device, pin)
            assert dev.bar_sizes == (0x100000, 0, 0, 0, 0, 0, 0)
            (res,) = await dev.resources()
            assert (res.index, res.start, res.size, res.io) == (0, start, 0x100000, False)
            starts.append(start)
        assert starts[0] != starts[1]
        # A guest-physical address reaches the BAR that decodes it, as through a root complex.
        assert await bus.mmio_read(starts[1], 4) == EDU_ID
        await bus.mmio_write(starts[0] + 4, 4, 0x12345678)  # edu liveness: reads back inverted
        assert await bus.mmio_read(starts[0] + 4, 4) == ~0x12345678 & 0xFFFFFFFF
        assert await second.bar_read(0, 4, 4) != ~0x12345678 & 0xFFFFFFFF


async def test_guest_reprograms_and_routing_follows(tmp_path: Path) -> None:
    async with (
        running_backend(_config(EDU), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory")) as bus,
    ):
        (edu,) = bus.devices
        old = (await edu.resources())[0].start
        # The all-ones sizing sequence still answers the size mask.
        await edu.config_write(0x10, 4, 0xFFFFFFFF)
        assert await edu.config_read(0x10, 4) == 0xFFF00000
        await edu.config_write(0x10, 4, 0xD000_0000)
        assert await bus.mmio_read(0xD000_0000, 4) == EDU_ID
        with pytest.raises(pcifront.UnclaimedAddressError, match=f"{old:#x}"):
            await bus.mmio_read(old, 4)
        # Memory decode off: nothing answers.
        await edu.config_write(0x04, 2, 0)
        with pytest.raises(pcifront.UnclaimedAddressError, match="decode off"):
            await bus.mmio_read(0xD000_0000, 4)
        with pytest.raises(pcifront.UnclaimedAddressError, match="aligned"):
            await bus.mmio_read(0xD000_0002, 4)
        # A reset gives back what firmware assigned.
        line = await edu.config_read(0x3C, 1)
        await edu.config_write(0x3C, 1, 0x42)
        await edu.reset()
        assert await edu.config_read(0x3C, 1) == line
        assert (await edu.resources())[0].start == old
        assert await bus.mmio_read(old, 4) == EDU_ID


async def test_snapshot_sizes_from_bar_sizes_and_dump_addresses_kept(tmp_path: Path) -> None:
    name = "eth_intel_82579lm"
    dump = parse_dump((DATA / f"{name}.txt").read_text())[0].data
    bar0_dump = int.from_bytes(dump[0x10:0x14], "little") & ~0xF
    bar1_dump = int.from_bytes(dump[0x14:0x18], "little") & ~0xF
    bar2_dump = int.from_bytes(dump[0x18:0x1C], "little") & ~0x3
    assert bar0_dump and bar1_dump and bar2_dump
    config = _config(
        _snapshot(name, "sized", "0 = 0x20000, 1 = 0x1000"), _snapshot(name, "kept")
    )
    async with (
        running_backend(config, tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory")) as bus,
    ):
        sized, kept = bus.devices
        sized_res = {r.index: r for r in await sized.resources()}
        kept_res = {r.index: r for r in await kept.resources()}
        # Sized BARs are placed by firmware in the guest's window, naturally aligned.
        assert sized_res[0].size == 0x20000 and sized_res[1].size == 0x1000
        for index in (0, 1):
            r = sized_res[index]
            assert r.start % r.size == 0 and r.start >= DEFAULT_WINDOWS.mmio32.base
            assert r.start not in (bar0_dump, bar1_dump)
        # The unsized I/O BAR keeps the dump's address; so does every BAR of "kept".
        assert sized_res[2].start == bar2_dump and sized_res[2].io
        assert [kept_res[i].start for i in (0, 1, 2)] == [bar0_dump, bar1_dump, bar2_dump]
        # What firmware placed overlaps nothing. (The kept BARs may overlap each other: a
        # dump's BAR0 size is only guessed from its address's alignment.)
        others = [r for r in kept_res.values() if not r.io] + [sized_res[1]]
        for r in others:
            assert r.end < sized_res[0].start or r.start > sized_res[0].end
