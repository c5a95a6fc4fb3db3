"""Floods: many connections, pipelined requests nobody reads, big replies, in-flight overruns.

A flood may cost the flooding guest its own service (back-pressure, errors,
a disconnect); it must not cost guest0 anything, and everything it held is
given back once it goes.
"""

from __future__ import annotations

import trio
from _hostile import CFG_READ, EDU1, PING, SNAPSHOT, is_error, ok, pack, peer
from conftest import sentinel

from shared.protocol import ValueReply


async def test_connection_flood(backend, kind):
    """100 guest1 connections at once, idle, then all gone: fds come back (the sentinel).

    The backend may refuse some ([limits]: unauthenticated connections per source,
    connections per guest); a refusal is a fine answer, a stall or a leak is not.
    """
    async with sentinel(backend, kind):
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)
            done = trio.Event()

            async def session() -> None:
                async with peer(backend.address(kind)) as p:
                    await p.send(pack(0x01, 1, 0, ["ping"], [65536, 64], "guest1"))
                    with trio.move_on_after(10):
                        try:
                            await p.receive()
                        except (trio.EndOfChannel, trio.BrokenResourceError):
                            pass  # refused before the handshake
                    ready.release()
                    await done.wait()

            for _ in range(100):
                nursery.start_soon(session)
            for _ in range(100):
                await ready.acquire()
            done.set()


async def test_pipelined_requests_nobody_reads(backend, kind):
    """20,000 requests sent as fast as possible and no reply ever read."""
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            frames = [pack(CFG_READ, i, EDU1, 0, 4) for i in range(20_000)]
            with trio.move_on_after(5):  # back-pressure may stop us: that is the point
                for start in range(0, len(frames), 500):
                    await p.send_many(frames[start : start + 500])
                    if p.send_refused:
                        break


async def test_big_replies_nobody_reads(backend, kind):
    """Bus snapshots with config images (the largest replies) requested and never read."""
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            with trio.move_on_after(5):
                for start in range(0, 3000, 50):
                    await p.send_many([pack(SNAPSHOT, i, True) for i in range(start, start + 50)])
                    if p.send_refused:
                        break


async def test_pipelined_burst_gets_exactly_one_answer_each(backend, kind):
    """200 requests in one write: the backend answers as it reads (batches of at most 32),
    so its window never overflows; each request gets exactly one reply, in order."""
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            await p.send_many([pack(PING, i) for i in range(200)])
            replies = await p.replies(200)
            assert [m.request_id for m in replies] == list(range(200))
            assert not any(is_error(m) for m in replies)


async def test_fresh_session_after_a_flood_is_served(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            await p.send_many([pack(CFG_READ, i, EDU1, 0, 4) for i in range(2000)])
        async with peer(backend.address(kind), handshake=True) as p:
            reply = ok(await p.request(pack(CFG_READ, 1, EDU1, 0, 4)))
            assert isinstance(reply, ValueReply) and reply.value == 0x11E81234
