"""MSI and MSI-X enable sequences, MSI-X table indexes, and interrupt ownership (XSA-157/164/237).

The attacker (guest1) owns edu1 (MSI) and msix1 (a 16-entry MSI-X table).
Every sequence must get typed answers: enabling what is enabled is an error,
disabling what is not enabled does nothing, the three modes exclude each
other, MSI-X needs memory decode, and every vector or table index is checked
against the real table. Warnings a guest can trigger are rate-limited.
"""

from __future__ import annotations

import random

import pytest
import trio
from _hostile import (
    BAR_WRITE,
    CFG_READ,
    CFG_WRITE,
    IRQ_DISABLE,
    IRQ_ENABLE,
    IRQ_EOI,
    IRQ_MASK,
    find_devices,
    is_error,
    ok,
    pack,
    peer,
)
from conftest import sentinel

from shared.protocol import FUNCTION_MASK_VECTOR, IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX

EDU, MSIX = 0x11E8, 0x5EC0
MSIX_TABLE = 16
COMMAND, MEMORY_DECODE = 0x04, 0x2


class Rid:
    def __init__(self) -> None:
        self.n = 100

    def __call__(self) -> int:
        self.n += 1
        return self.n


async def test_enable_sequences_get_typed_answers(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            rid, devs = Rid(), await find_devices(p)
            edu = devs[EDU]
            ok(await p.request(pack(IRQ_ENABLE, rid(), edu, IRQ_MODE_MSI, 1, False)))
            # XSA-157: enabling an enabled mode, or another mode on top, is a clear error.
            assert is_error(await p.request(pack(IRQ_ENABLE, rid(), edu, IRQ_MODE_MSI, 1, False)))
            assert is_error(await p.request(pack(IRQ_ENABLE, rid(), edu, IRQ_MODE_INTX, 1, False)))
            assert is_error(await p.request(pack(IRQ_ENABLE, rid(), edu, IRQ_MODE_MSIX, 1, False)))
            ok(await p.request(pack(IRQ_DISABLE, rid(), edu, IRQ_MODE_MSI)))
            # Disabling what is not enabled does nothing (and says so without failing).
            for mode in (IRQ_MODE_MSI, IRQ_MODE_MSIX, IRQ_MODE_INTX):
                reply = await p.request(pack(IRQ_DISABLE, rid(), edu, mode))
                assert reply.request_id == rid.n
            # Bad arguments: vector counts that are not possible, unknown modes.
            for mode, vectors in [(IRQ_MODE_MSI, 3), (IRQ_MODE_MSI, 64), (IRQ_MODE_INTX, 2),
                                  (IRQ_MODE_MSI, 0), (7, 1), (IRQ_MODE_MSI, 2**32 - 1)]:
                assert is_error(
                    await p.request(pack(IRQ_ENABLE, rid(), edu, mode, vectors, False))
                ), (mode, vectors)
            ok(await p.request(pack(IRQ_ENABLE, rid(), edu, IRQ_MODE_INTX, 1, False)))
            ok(await p.request(pack(IRQ_DISABLE, rid(), edu, IRQ_MODE_INTX)))
        stats = backend.stats()
        assert stats["irq"]["bindings"]["edu1"]["guest"] is None


async def test_msix_needs_memory_decode_and_a_table_that_big(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            rid, devs = Rid(), await find_devices(p)
            msix = devs[MSIX]
            ok(await p.request(pack(CFG_WRITE, rid(), msix, COMMAND, 2, 0)))
            assert is_error(await p.request(pack(IRQ_ENABLE, rid(), msix, IRQ_MODE_MSIX, 1, False)))
            ok(await p.request(pack(CFG_WRITE, rid(), msix, COMMAND, 2, MEMORY_DECODE)))
            # XSA-164: more vectors than the table has.
            for vectors in (MSIX_TABLE + 1, 2048, 2049, 2**32 - 1):
                assert is_error(
                    await p.request(pack(IRQ_ENABLE, rid(), msix, IRQ_MODE_MSIX, vectors, False))
                ), vectors
            ok(await p.request(pack(IRQ_ENABLE, rid(), msix, IRQ_MODE_MSIX, MSIX_TABLE, False)))
            # Table indexes out of range, for EOI and mask.
            for vector in (MSIX_TABLE, MSIX_TABLE + 1, 0xFFFE, 2**32 - 1):
                assert is_error(await p.request(pack(IRQ_EOI, rid(), msix, vector))), vector
                assert is_error(await p.request(pack(IRQ_MASK, rid(), msix, vector, True))), vector
            for vector in (0, MSIX_TABLE - 1, FUNCTION_MASK_VECTOR):
                ok(await p.request(pack(IRQ_MASK, rid(), msix, vector, True)))
                ok(await p.request(pack(IRQ_MASK, rid(), msix, vector, False)))
            # Writes into the BAR at and past the table's end, and over the PBA.
            for offset in (MSIX_TABLE * 16, MSIX_TABLE * 16 + 12, 0x8000, 0x8008, 0xFFFC):
                reply = await p.request(pack(BAR_WRITE, rid(), msix, 0, offset, 4, 0xFFFFFFFF))
                assert reply.request_id == rid.n
            ok(await p.request(pack(IRQ_DISABLE, rid(), msix, IRQ_MODE_MSIX)))


async def test_msi_registers_written_through_config_space_stay_virtual(backend, kind):
    """XSA-120/128/129: raw config writes over the MSI capability and Command register."""
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            rid, devs = Rid(), await find_devices(p)
            edu = devs[EDU]
            cap = (await p.request(pack(CFG_READ, rid(), edu, 0x34, 1))).value
            assert cap, "edu has a capability list"
            for offset in range(cap, cap + 24, 2):
                reply = await p.request(pack(CFG_WRITE, rid(), edu, offset, 2, 0xFFFF))
                assert reply.request_id == rid.n
            # Whatever the writes did, no interrupt binding appeared behind the router's back.
            assert backend.stats()["irq"]["bindings"]["edu1"]["guest"] is None
            # And the router's own rules still apply afterwards.
            ok(await p.request(pack(IRQ_ENABLE, rid(), edu, IRQ_MODE_MSI, 1, False)))
            ok(await p.request(pack(IRQ_DISABLE, rid(), edu, IRQ_MODE_MSI)))


async def test_interrupt_requests_for_devices_of_others(backend, kind):
    """XSA-237: guest1 names addresses that are not on its bus (guest0's edu is 0 on *its* bus)."""
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            rid = Rid()
            for device in (0x0010, 0x0100, 0xFFFF, 2**32 - 1):
                for frame in (
                    pack(IRQ_ENABLE, rid(), device, IRQ_MODE_MSI, 1, False),
                    pack(IRQ_DISABLE, rid(), device, IRQ_MODE_MSI),
                    pack(IRQ_EOI, rid(), device, 0),
                    pack(IRQ_MASK, rid(), device, 0, True),
                ):
                    assert is_error(await p.request(frame)), frame
        assert backend.stats()["irq"]["bindings"]["edu0"]["guest"] is None


async def test_random_enable_disable_sequences_and_log_flooding(backend, kind):
    """XSA-157: 600 random interrupt operations; every one answered, warnings rate-limited."""
    seed = random.randrange(2**32)
    print(f"interrupt sequence seed: {seed}")
    rng = random.Random(seed)
    before = backend.stats()["irq"]
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            rid, devs = Rid(), await find_devices(p)
            targets = [devs[EDU], devs[MSIX]]
            ok(await p.request(pack(CFG_WRITE, rid(), devs[MSIX], COMMAND, 2, MEMORY_DECODE)))
            started = trio.current_time()
            for _ in range(600):
                dev = rng.choice(targets)
                mode = rng.choice([IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX])
                vector = rng.choice([0, 1, 15, 16, FUNCTION_MASK_VECTOR, 2**32 - 1])
                vectors = rng.choice([1, 2, 4, 16, 17])
                op = rng.randrange(4)
                if op == 0:
                    frame = pack(IRQ_ENABLE, rid(), dev, mode, vectors, False)
                elif op == 1:
                    frame = pack(IRQ_DISABLE, rid(), dev, mode)
                elif op == 2:
                    frame = pack(IRQ_EOI, rid(), dev, vector)
                else:
                    frame = pack(IRQ_MASK, rid(), dev, vector, rng.random() < 0.5)
                reply = await p.request(frame)
                assert reply.request_id == rid.n, (frame, reply)
            elapsed = trio.current_time() - started
    after = backend.stats()["irq"]
    logged = after["warnings_logged"] - before["warnings_logged"]
    # InterruptLimits: 1 warning per second per guest, burst 10.
    assert logged <= 10 + elapsed * 1.0 + 1, (logged, elapsed)
    assert after["warnings_suppressed"] > before["warnings_suppressed"]


async def test_eventfd_enable_with_wrong_or_missing_fds(backend, fd_kind):
    """Fds that are not eventfds, too few or too many: refused, and none of them kept."""
    import os

    async with sentinel(backend, fd_kind):
        async with peer(backend.address(fd_kind), handshake=True) as p:
            rid, devs = Rid(), await find_devices(p)
            edu = devs[EDU]
            r, w = os.pipe()
            efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
            try:
                cases = [([r], 1), ([], 1), (efds[:2], 1), (efds[:1], 2), ([w, efds[0]], 2)]
                for fds, vectors in cases:
                    frame = pack(IRQ_ENABLE, rid(), edu, IRQ_MODE_MSI, vectors, True)
                    if fds:
                        await p.transport.send_frame_with_fds(frame, fds)
                    else:
                        await p.send(frame)
                    reply = await p.receive()
                    assert is_error(reply), (fds, vectors, reply)
            finally:
                for fd in (r, w, *efds):
                    os.close(fd)


@pytest.fixture(params=["unix", "shm"])
def fd_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)
