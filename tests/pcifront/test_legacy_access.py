"""CF8/CFC (Configuration Mechanism #1) and ECAM, checked by a small simulated firmware.

The firmware enumerates the bus through each mechanism, sizes every BAR (save,
write all ones, read back, restore), walks the capability lists, and the result
is compared with ``bus.devices`` (issue 10 §4).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import pcifront
from pciback.testing import running_backend
from pcifront import Ecam, LegacyAccessError, PortIO
from shared.pci import PciAddress, walk_capabilities

DATA = Path(__file__).resolve().parents[1] / "data" / "pcidata"
EDU = "[[device]]\nid = 'edu'\nkind = 'emulated'\nmodel = 'edu'\nguest = 'guest0'\n"


def _snapshot(name: str, dev_id: str) -> str:
    return (
        f"[[device]]\nid = '{dev_id}'\nkind = 'snapshot'\ndump = '{DATA / name}.txt'\n"
        "guest = 'guest0'\n"
    )


CONFIG = (
    "[[guest]]\nname = 'guest0'\n" + EDU
    + _snapshot("eth_intel_82576_sriov", "nic")  # 4 KiB: MSI-X, PCIe, AER, SR-IOV...
    + _snapshot("sata_intel_ich10_ahci", "sata")  # 256 B, five I/O BARs
)

Read = Callable[[PciAddress, int, int], Awaitable[int]]
Write = Callable[[PciAddress, int, int, int], Awaitable[None]]


@dataclass
class Found:
    address: PciAddress
    vendor: int
    device: int
    bar_sizes: list[int]
    caps: list[tuple[bool, int, int]]


async def firmware(read: Read, write: Write, *, extended: bool) -> list[Found]:
    """What SeaBIOS does, in miniature: scan, size BARs, walk capabilities."""
    found = []
    for slot in range(32):
        for function in range(8):
            address = PciAddress(0, 0, slot, function)
            ids = await read(address, 0, 4)
            if ids == 0xFFFFFFFF:
                # A guest's bus may hold a function without function 0 (it keeps its
                # physical function number), so probe them all, as Linux does for
                # hypervisor-isolated functions.
                continue
            header = await read(address, 0x0E, 1)
            sizes = [0] * 6
            index = 0
            count = {0: 6, 1: 2, 2: 1}[header & 0x7F]
            while index < count:
                offset = 0x10 + 4 * index
                saved = await read(address, offset, 4)
                await write(address, offset, 4, 0xFFFFFFFF)
                mask = await read(address, offset, 4)
                await write(address, offset, 4, saved)
                if mask & 1:  # I/O
                    sizes[index] = (~(mask & ~0x3) + 1) & 0xFFFF if mask & ~0x3 else 0
                    index += 1
                    continue
                if mask & 0x6 == 0x4:  # 64-bit: size the pair
                    saved_hi = await read(address, offset + 4, 4)
                    await write(address, offset + 4, 4, 0xFFFFFFFF)
                    high = await read(address, offset + 4, 4)
                    await write(address, offset + 4, 4, saved_hi)
                    full = (high << 32) | (mask & ~0xF)
                    sizes[index] = (~full + 1) & 0xFFFF_FFFF_FFFF_FFFF if full else 0
                    index += 2
                    continue
                sizes[index] = (~(mask & ~0xF) + 1) & 0xFFFFFFFF if mask & ~0xF else 0
                index += 1
            caps = []
            if await read(address, 0x06, 2) & 0x10:
                pointer = await read(address, 0x34 if header & 0x7F != 2 else 0x14, 1) & 0xFC
                while pointer:
                    caps.append((False, await read(address, pointer, 1), pointer))
                    pointer = await read(address, pointer + 1, 1) & 0xFC
            if extended:
                offset = 0x100
                while offset:
                    head = await read(address, offset, 4)
                    if head in (0, 0xFFFFFFFF):
                        break
                    caps.append((True, head & 0xFFFF, offset))
                    offset = (head >> 20) & 0xFFC
            found.append(Found(address, ids & 0xFFFF, ids >> 16, sizes, caps))
            if function == 0 and not header & 0x80:
                break
    return found


def _expected(bus: pcifront.Bus, *, extended: bool) -> list[Found]:
    out = []
    for dev in bus.devices:
        assert dev.config is not None
        caps = [
            (cap.extended, cap.id, cap.offset)
            for cap in walk_capabilities(dev.config)
            if extended or not cap.extended
        ]
        caps.sort(key=lambda c: c[0])  # standard first, then extended, each in list order
        out.append(Found(dev.pci_address, dev.vendor_id, dev.device_id,
                         list(dev.bar_sizes[:6]), caps))
    return out


async def test_firmware_through_cf8_cfc_sees_bus_devices(tmp_path: Path) -> None:
    async with (
        running_backend(CONFIG, tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory"), include_config=True) as bus,
    ):
        io = PortIO(bus)
        session = io.session()
        found = await firmware(session.config_read, session.config_write, extended=True)
        assert found == _expected(bus, extended=True)
        assert len(found) == 3 and found[1].bar_sizes[0] == bus.devices[1].bar_sizes[0]
        # Absent functions and disabled accesses read all ones.
        await io.write(0xCF8, 4, 0x8000_F800)  # device 31: absent
        assert await io.read(0xCFC, 4) == 0xFFFFFFFF
        await io.write(0xCF8, 4, 0x0000_0000)  # enable bit clear
        assert await io.read(0xCFE, 2) == 0xFFFF
        assert io.stats.unclaimed_reads >= 2


async def test_cf8_cfc_byte_and_word_lanes_and_the_latch(tmp_path: Path) -> None:
    async with (
        running_backend(CONFIG, tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory"), include_config=True) as bus,
    ):
        io = PortIO(bus)
        await io.write(0xCF8, 4, 0x8000_0000 | 0x03)  # reserved bits 1:0 read back as 0
        assert await io.read(0xCF8, 4) == 0x8000_0000
        assert await io.read(0xCFC, 4) == 0x11E81234
        assert await io.read(0xCFE, 2) == 0x11E8
        assert await io.read(0xCFD, 1) == 0x12
        await io.write(0xCF8, 4, 0x8000_003C)
        await io.write(0xCFC, 1, 0x42)  # the interrupt line
        assert await bus.devices[0].config_read(0x3C, 1) == 0x42
        # Extended registers through bits 27:24 of the latch (offset 0x100 of the NIC).
        await io.write(0xCF8, 4, 0x8100_0800)
        assert await io.read(0xCFC, 4) == await bus.devices[1].config_read(0x100, 4)
        for port, size in ((0xCFD, 2), (0xCFC, 3), (0xCF9, 1), (0xCFE, 4)):
            with pytest.raises(LegacyAccessError):
                await io.read(port, size)
        with pytest.raises(LegacyAccessError):
            await io.write(0xCF8, 2, 0)


async def test_concurrent_users_never_interleave_address_and_data(tmp_path: Path) -> None:
    """64 tasks, each preempted between its address and data phase, all read the right word."""
    async with (
        running_backend(CONFIG, tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory"), include_config=True) as bus,
    ):
        io = PortIO(bus)
        images = {dev.pci_address: dev.config for dev in bus.devices}
        failures: list[str] = []
        rng = random.Random(1234)
        plans = [
            [(rng.choice(list(images)), rng.randrange(0, 0x40, 4)) for _ in range(20)]
            for _ in range(64)
        ]

        async def user(plan: list[tuple[PciAddress, int]], explicit: bool) -> None:
            port = io.session() if explicit else io
            for address, offset in plan:
                latch = 0x8000_0000 | (address.device << 11) | (address.function << 8) | offset
                await port.write(0xCF8, 4, latch)
                await trio.lowlevel.checkpoint()  # another user runs here, as on a vCPU switch
                value = await port.read(0xCFC, 4)
                image = images[address]
                assert image is not None
                expected = int.from_bytes(image[offset : offset + 4], "little")
                if offset != 0x3C and value != expected:
                    failures.append(f"{address}@{offset:#x}: {value:#x} != {expected:#x}")

        async with trio.open_nursery() as nursery:
            for n, plan in enumerate(plans):
                nursery.start_soon(user, plan, n % 2 == 0)
        assert failures == []


async def test_atomic_config_read_under_concurrency(tmp_path: Path) -> None:
    async with (
        running_backend(CONFIG, tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory"), include_config=True) as bus,
    ):
        io = PortIO(bus)
        results: dict[int, int] = {}

        async def one(n: int) -> None:
            dev = bus.devices[n % 3]
            results[n] = await io.config_read(dev.pci_address, 0, 4)

        async with trio.open_nursery() as nursery:
            for n in range(60):
                nursery.start_soon(one, n)
        for n, value in results.items():
            dev = bus.devices[n % 3]
            assert value == dev.vendor_id | dev.device_id << 16


async def test_firmware_through_ecam_sees_bus_devices(tmp_path: Path) -> None:
    async with (
        running_backend(CONFIG, tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory"), include_config=True) as bus,
    ):
        ecam = Ecam(bus)

        async def read(address: PciAddress, offset: int, size: int) -> int:
            return await ecam.read(Ecam.offset_of(address, offset), size)

        async def write(address: PciAddress, offset: int, size: int, value: int) -> None:
            await ecam.write(Ecam.offset_of(address, offset), size, value)

        found = await firmware(read, write, extended=True)
        assert found == _expected(bus, extended=True)
        # The NIC's extended capabilities were reached through the window.
        assert any(ext for ext, _, _ in found[1].caps)
        # Past a 256-byte function's space, and absent functions: all ones.
        sata = bus.devices[2].pci_address
        assert await ecam.read(Ecam.offset_of(sata, 0x100), 4) == 0xFFFFFFFF
        assert await ecam.read(Ecam.offset_of("00:1f.0"), 2) == 0xFFFF
        await ecam.write(Ecam.offset_of("00:1f.0", 0x04), 2, 0)
        assert ecam.stats.dropped_writes == 1
        for offset, size in ((2, 4), (Ecam.size, 1), (-4, 4)):
            with pytest.raises(LegacyAccessError):
                await ecam.read(offset, size)
