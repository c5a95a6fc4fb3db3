"""BAR, ROM and Command-register abuse (XSA-120/126), and whole-config-space sweeps.

The guest drives only the Command bits its policy allows (decode and bus
master); every other bit stays virtual, whatever it writes. BAR and ROM
registers take any value (sizing, garbage addresses) without the backend
losing track of the device, and BAR accesses past a BAR's end are refused.
"""

from __future__ import annotations

import pytest
from _hostile import (
    BAR_READ,
    BAR_WRITE,
    CFG_READ,
    CFG_WRITE,
    PING,
    find_devices,
    is_error,
    ok,
    pack,
    peer,
)
from conftest import sentinel

from shared.protocol import ValueReply

EDU, MSIX = 0x11E8, 0x5EC0
COMMAND = 0x04
#: command.io | command.memory | command.bus_master (docs/policy.md): the guest's bits.
GUEST_COMMAND_BITS = 0x0007
EDU_BAR0_SIZE = 1 << 20


async def test_command_register_is_shadowed(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            edu = (await find_devices(p))[EDU]
            before = backend.stats()["irq"]["bindings"]["edu1"]["device_command"]
            for rid, value in enumerate((0xFFFF, 0x0000, 0xFBF8, 0x0400, 0xFFFF), start=1):
                ok(await p.request(pack(CFG_WRITE, rid, edu, COMMAND, 2, value)))
                device = backend.stats()["irq"]["bindings"]["edu1"]["device_command"]
                # XSA-120: bits outside the guest's set never reach the device.
                assert device & ~GUEST_COMMAND_BITS == before & ~GUEST_COMMAND_BITS, (
                    hex(value), hex(device), hex(before)
                )
                assert device & GUEST_COMMAND_BITS == value & GUEST_COMMAND_BITS
            # Byte and unaligned writes over Command/Status do not get around it.
            for rid, (offset, size, value) in enumerate(
                [(0x05, 1, 0xFF), (0x04, 4, 0xFFFFFFFF), (0x06, 2, 0xFFFF)], start=10
            ):
                await p.request(pack(CFG_WRITE, rid, edu, offset, size, value))
                device = backend.stats()["irq"]["bindings"]["edu1"]["device_command"]
                assert device & ~GUEST_COMMAND_BITS == before & ~GUEST_COMMAND_BITS


async def test_bar_and_rom_registers_take_any_value(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            devs = await find_devices(p)
            rid = 100
            for dev in devs.values():
                for offset in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
                    for value in (0xFFFFFFFF, 0xFFFFFFFE, 0x00000000, 0xDEADBEEF, 0x00000001):
                        rid += 1
                        await p.request(pack(CFG_WRITE, rid, dev, offset, 4, value))
                        rid += 1
                        reply = await p.request(pack(CFG_READ, rid, dev, offset, 4))
                        assert isinstance(reply, ValueReply), reply
            # The device is still reached by BAR index, whatever its BAR registers say.
            edu = devs[EDU]
            ok(await p.request(pack(CFG_WRITE, rid + 1, edu, COMMAND, 2, 0x0002)))
            reply = ok(await p.request(pack(BAR_READ, rid + 2, edu, 0, 0, 4)))
            assert reply.value == 0x010000ED


@pytest.mark.parametrize(
    ("bar", "offset", "size"),
    [
        (0, EDU_BAR0_SIZE, 4),  # just past the end
        (0, EDU_BAR0_SIZE - 2, 4),  # straddles the end
        (0, 2**64 - 4, 4),  # wraps
        (1, 0, 4),  # an unimplemented BAR
        (5, 0, 4),
        (0, 0, 3),  # odd size
        (0, 0x02, 4),  # unaligned register
    ],
    ids=["past-end", "straddle", "wrap", "bar1", "bar5", "size3", "unaligned"],
)
async def test_bar_access_outside_the_bar(backend, kind, bar, offset, size):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            edu = (await find_devices(p))[EDU]
            ok(await p.request(pack(CFG_WRITE, 1, edu, COMMAND, 2, 0x0002)))
            assert is_error(await p.request(pack(BAR_READ, 2, edu, bar, offset, size)))
            assert is_error(await p.request(pack(BAR_WRITE, 3, edu, bar, offset, size, 0)))
            ok(await p.request(pack(PING, 4)))


async def test_whole_config_space_sweep(backend, kind):
    """Every dword of both devices' 4 KiB config space written with ones, then read back."""
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            devs = await find_devices(p)
            rid = 0
            for dev in devs.values():
                for base in range(0, 0x1000, 0x100):
                    frames = []
                    for offset in range(base, base + 0x100, 4):
                        rid += 1
                        frames.append(pack(CFG_WRITE, rid, dev, offset, 4, 0xFFFFFFFF))
                        rid += 1
                        frames.append(pack(CFG_READ, rid, dev, offset, 4))
                    # Two batches of 64: within max_in_flight, so each must be answered.
                    for half in (frames[:64], frames[64:]):
                        await p.send_many(half)
                        for reply in await p.replies(64):
                            assert reply.request_id <= rid, reply
            edu = devs[EDU]
            reply = ok(await p.request(pack(CFG_READ, rid + 1, edu, 0, 4)))
            assert reply.value == 0x11E81234  # identity registers are read-only
