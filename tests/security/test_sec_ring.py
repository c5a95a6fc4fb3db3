"""Ring attacks on ``shm:``: the guest writes any shared byte at any time.

guest1 completes a normal shm: handshake, then reaches into the shared region
its transport mapped (an attacker has no reason to use our ring code) and
writes hostile indices and record lengths, races the backend's reads, floods
the doorbell, and wedges its own doorbell eventfd. Corruption disconnects
guest1 alone; garbage in fields the backend only uses for doorbells changes
nothing but doorbells.
"""

from __future__ import annotations

import os
import struct
import threading

import pytest
import trio
from _hostile import CFG_READ, EDU1, PING, Peer, ok, pack, peer
from conftest import sentinel

from shared.protocol import Goodbye, ValueReply
from shared.ring import RECORD_HEADER, record_size
from shared.ring._region import CLIENT_TO_SERVER, SERVER_TO_CLIENT

U32 = struct.Struct("<I")
PROD, CONS_EVENT, CONS, PROD_EVENT = 0, 4, 64, 68


class Region:
    """The attacker's view of the shared memory of its own shm: session."""

    def __init__(self, p: Peer) -> None:
        session = p.transport._session  # an attacker uses whatever it mapped
        assert session is not None, "handshake first"
        self.session = session
        self.mm = session.mm
        self.layout = session.layout

    def ctrl(self, direction: int, field: int) -> int:
        return self.layout.ring_spec(direction).ctrl_offset + field

    def get(self, direction: int, field: int) -> int:
        return U32.unpack_from(self.mm, self.ctrl(direction, field))[0]

    def put(self, direction: int, field: int, value: int) -> None:
        U32.pack_into(self.mm, self.ctrl(direction, field), value & 0xFFFFFFFF)

    def data(self, direction: int, index: int) -> int:
        spec = self.layout.ring_spec(direction)
        return spec.data_offset + (index & (spec.size - 1))

    def doorbell(self) -> None:
        os.eventfd_write(self.session.tx_port.fileno(), 1)


@pytest.fixture
def shm(backend):
    return backend.address("shm")


async def _corrupt_c2s(backend, shm: str, corrupt) -> list:
    async with sentinel(backend, "shm"):
        async with peer(shm, handshake=True) as p:
            ok(await p.request(pack(PING, 1)))
            region = Region(p)
            corrupt(region, region.get(CLIENT_TO_SERVER, PROD))
            region.doorbell()
            got = await p.until_closed()
            assert not any(isinstance(m, ValueReply) for m in got), got
            return got


def _record(region: Region, prod: int, length: int, advance: int) -> None:
    U32.pack_into(region.mm, region.data(CLIENT_TO_SERVER, prod), length)
    region.put(CLIENT_TO_SERVER, PROD, prod + advance)


@pytest.mark.parametrize(
    "attack",
    [
        lambda r, prod: r.put(CLIENT_TO_SERVER, PROD, prod + (1 << 30)),  # far ahead
        lambda r, prod: r.put(CLIENT_TO_SERVER, PROD, prod - 8),  # backwards
        lambda r, prod: r.put(CLIENT_TO_SERVER, PROD, prod + 4),  # misaligned
        lambda r, prod: _record(r, prod, 0xFFFFFFFF, 8),  # 4 GiB record
        lambda r, prod: _record(r, prod, r.layout.max_record + 1, 8),  # over max_record
        lambda r, prod: _record(r, prod, 1000, 8),  # runs past the published prod
        lambda r, prod: _record(r, prod, 2, 8),  # a 2-byte frame: not a message
    ],
    ids=["prod-ahead", "prod-backwards", "prod-misaligned", "len-4g", "len-over-max",
         "len-past-prod", "garbage-record"],
)
async def test_hostile_producer_indices_and_lengths(backend, shm, attack):
    await _corrupt_c2s(backend, shm, attack)


@pytest.mark.parametrize(
    "value",
    [lambda c: c + 8192 * 1024, lambda c: c - 8, lambda c: c + 3],
    ids=["cons-far-ahead", "cons-backwards", "cons-misaligned"],
)
async def test_hostile_consumer_index_on_the_reply_ring(backend, shm, value):
    async with sentinel(backend, "shm"):
        async with peer(shm, handshake=True) as p:
            ok(await p.request(pack(PING, 1)))
            region = Region(p)
            cons = region.get(SERVER_TO_CLIENT, CONS)
            region.put(SERVER_TO_CLIENT, CONS, value(cons))
            # The backend validates cons when it needs space: fill its ring with replies.
            for i in range(2, 6000):
                await p.send(pack(CFG_READ, i, EDU1, 0, 4))
                if p.send_refused:
                    break
            # The backend may disconnect guest1 or just stop sending to it; either way only
            # guest1 is affected (the sentinel checks guest0 throughout).
            with trio.move_on_after(2):
                await p.until_closed()


LATE = 5.0


async def test_garbage_in_the_shared_header_changes_nothing(backend, shm):
    """Magic, version, sizes and max_record are informational: each side keeps its own copy."""
    async with sentinel(backend, "shm"):
        async with peer(shm, handshake=True) as p:
            region = Region(p)
            region.mm[0:64] = b"\xff" * 64
            for i in range(50):
                reply = await p.request(pack(CFG_READ, i, EDU1, 0, 4), timeout=LATE)
                assert isinstance(reply, ValueReply) and reply.value == 0x11E81234, reply


async def test_garbage_event_indices_hurt_only_their_writer(backend, shm):
    """Event indices only decide doorbells: garbage may stall guest1's own session, no other."""
    async with sentinel(backend, "shm"):
        async with peer(shm, handshake=True) as p:
            region = Region(p)
            for direction in (CLIENT_TO_SERVER, SERVER_TO_CLIENT):
                region.put(direction, CONS_EVENT, 0xDEADBEEF)
                region.put(direction, PROD_EVENT, 0x12345678)
            with trio.move_on_after(2):
                for i in range(50):
                    await p.request(pack(CFG_READ, i, EDU1, 0, 4))


async def test_double_fetch_race_on_published_records(backend, shm):
    """XSA-155: a thread rewrites every published record while the backend reads them."""
    async with sentinel(backend, "shm"):
        async with peer(shm, handshake=True) as p:
            region = Region(p)
            spec = region.layout.ring_spec(CLIENT_TO_SERVER)
            stop = threading.Event()

            def scribble() -> None:
                junk = [b"\x00" * 16, b"\xff" * 16, pack(CFG_READ, 7, 0xFFFF, 0x1000, 4)]
                i = 0
                while not stop.is_set():
                    prod = region.get(CLIENT_TO_SERVER, PROD)
                    start = region.data(CLIENT_TO_SERVER, prod - record_size(16))
                    if start + RECORD_HEADER + 16 <= spec.data_offset + spec.size:
                        region.mm[start + RECORD_HEADER : start + RECORD_HEADER + 16] = (
                            junk[i % 3][:16].ljust(16, b"\x00")
                        )
                    i += 1

            thread = threading.Thread(target=scribble, daemon=True)
            thread.start()
            try:
                for i in range(300):
                    await p.send(pack(CFG_READ, i, EDU1, 0, 4))
                    if p.send_refused:
                        break
                    try:
                        msg = await p.receive(timeout=LATE)
                    except (trio.EndOfChannel, trio.BrokenResourceError):
                        break
                    if isinstance(msg, Goodbye):
                        break
            finally:
                stop.set()
                thread.join()


async def test_doorbell_storm(backend, shm):
    """XSA-332 at the transport: 200,000 doorbells from a thread while guest0 works."""
    async with sentinel(backend, "shm") as watch:
        async with peer(shm, handshake=True) as p:
            region = Region(p)
            fd = region.session.tx_port.fileno()

            def storm() -> None:
                for _ in range(200_000):
                    os.eventfd_write(fd, 1)

            before = watch.probes
            await trio.to_thread.run_sync(storm)
            reply = await p.request(pack(PING, 1), timeout=LATE)
            assert reply.request_id == 1
            assert watch.probes > before
