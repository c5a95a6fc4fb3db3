"""Notification storms (XSA-332): interrupt floods, EOI floods, and a wedged interrupt eventfd.

guest1 makes its edu1 raise interrupts as fast as it can ask and never reads
them, floods EOIs and mask toggles, and (stall 6 of issue 8) hands the backend
an eventfd it then turns blocking with a full counter. guest0 must not notice.
"""

from __future__ import annotations

import fcntl
import os

import pytest
import trio
from _hostile import (
    BAR_WRITE,
    CFG_WRITE,
    IRQ_ENABLE,
    IRQ_EOI,
    IRQ_MASK,
    PING,
    find_devices,
    ok,
    pack,
    peer,
)
from conftest import sentinel

from shared.protocol import IRQ_MODE_INTX, IRQ_MODE_MSI

EDU = 0x11E8
IRQ_RAISE = 0x60
COMMAND, MEMORY_AND_MASTER = 0x04, 0x6

@pytest.mark.parametrize("mode", [IRQ_MODE_MSI, IRQ_MODE_INTX], ids=["msi", "intx"])
async def test_interrupt_flood_never_read(backend, kind, mode):
    """3,000 raises pipelined without reading a single event: bounded by coalescing."""
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            edu = (await find_devices(p))[EDU]
            ok(await p.request(pack(CFG_WRITE, 1, edu, COMMAND, 2, MEMORY_AND_MASTER)))
            ok(await p.request(pack(IRQ_ENABLE, 2, edu, mode, 1, False)))
            frames = [pack(BAR_WRITE, 10 + i, edu, 0, IRQ_RAISE, 4, 1) for i in range(3000)]
            for start in range(0, len(frames), 50):
                await p.send_many(frames[start : start + 50])
                # The window of requests in flight is the guest's to keep: read replies
                # (and the events among them) only as far as the protocol forces us to.
                while len(p.received) < start:
                    await p.receive()
            ok(await p.answer(pack(PING, 99999), 99999))


async def test_eoi_and_mask_flood(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            edu = (await find_devices(p))[EDU]
            ok(await p.request(pack(IRQ_ENABLE, 1, edu, IRQ_MODE_INTX, 1, False)))
            rid = 10
            for _ in range(40):
                batch = []
                for _ in range(25):
                    rid += 1
                    batch.append(pack(IRQ_EOI, rid, edu, 0))
                    rid += 1
                    batch.append(pack(IRQ_MASK, rid, edu, 0, rid % 4 == 0))
                await p.send_many(batch)
                while len([m for m in p.received if m.TAG < 0x60]) < rid - 10 - 50:
                    await p.receive()
            ok(await p.answer(pack(PING, rid + 1), rid + 1))


@pytest.fixture(params=["unix", "shm"])
def fd_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_blocking_interrupt_eventfd_with_a_full_counter(backend, fd_kind):
    """Issue 8 stall 6: the guest clears O_NONBLOCK on its interrupt eventfd and fills it."""
    async with sentinel(backend, fd_kind):
        async with peer(backend.address(fd_kind), handshake=True) as p:
            edu = (await find_devices(p))[EDU]
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                await p.transport.send_frame_with_fds(
                    pack(IRQ_ENABLE, 1, edu, IRQ_MODE_MSI, 1, True), [efd]
                )
                ok(await p.receive())
                fcntl.fcntl(efd, fcntl.F_SETFL, fcntl.fcntl(efd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                os.eventfd_write(efd, 0xFFFFFFFFFFFFFFFE)
                await p.send(pack(BAR_WRITE, 2, edu, 0, IRQ_RAISE, 4, 1))
                # guest0 probes meanwhile (the sentinel); give a stall time to show.
                with trio.move_on_after(LATENCY_PROBE):
                    await p.receive()
                    await trio.sleep_forever()
            finally:
                # Unwedge the backend either way, so the harness can stop it.
                os.set_blocking(efd, False)
                try:
                    os.eventfd_read(efd)
                finally:
                    os.close(efd)


LATENCY_PROBE = 4.0
