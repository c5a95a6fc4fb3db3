"""Handshake abuse: frames out of order, lies in the Hello, and peers that never finish.

The handshake is reachable by anyone who can connect (no guest name needed),
so everything here is an attack from outside the set of known guests too.
"""

from __future__ import annotations

import pytest
import trio
from _hostile import (
    CFG_READ,
    EDU1,
    PING,
    SNAPSHOT,
    goodbye,
    hello,
    open_raw_socket,
    pack,
    peer,
)
from conftest import sentinel

from shared.errors import ErrorCode
from shared.protocol import Goodbye, HandshakeRejected, ValueReply, Welcome, encode_frame


async def test_goodbye_as_the_first_frame(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind)) as p:
            await p.send(goodbye())
            await p.until_closed()


@pytest.mark.parametrize(
    "first",
    [pack(PING, 1), pack(CFG_READ, 1, EDU1, 0, 4), pack(0x02, 1, 0, [], [65536, 64], "guest1")],
    ids=["ping", "config-read", "welcome"],
)
async def test_anything_but_hello_first_is_refused(backend, kind, first):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind)) as p:
            await p.send(first)
            got = await p.until_closed()
            assert not any(isinstance(m, Welcome | ValueReply) for m in got), got


async def test_second_hello_ends_the_connection(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            await p.send(hello())
            got = await p.until_closed()
            assert any(isinstance(m, Goodbye) for m in got), got


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (hello("nobody"), ErrorCode.UNKNOWN_GUEST),
        (hello(version=(99, 0)), ErrorCode.VERSION_MISMATCH),
    ],
    ids=["unknown-guest", "version-99"],
)
async def test_refused_hello_gets_a_typed_refusal(backend, kind, frame, code):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind)) as p:
            await p.send(frame)
            got = await p.until_closed()
            assert any(isinstance(m, HandshakeRejected) and m.code is code for m in got), got


@pytest.mark.parametrize(
    "frame",
    [
        hello(max_message_size=0),
        hello(max_message_size=2**32),
        hello(max_in_flight=0),
        hello(max_in_flight=2**40),
        hello(guest="g" * 100_000),
        hello(guest="\udcff"[:0] + "guest1\x00"),
        hello(features=["f" * 200] * 5000),
        pack(0x01, 1, 0, "features", [65536, 64], "guest1"),
        pack(0x01, 1, 0, [], [65536], "guest1"),
    ],
    ids=[
        "msgsize-0", "msgsize-4g", "inflight-0", "inflight-2^40", "guest-100k", "guest-nul",
        "features-5000", "features-str", "limits-short",
    ],
)
async def test_lying_hello_never_reaches_open(backend, kind, frame):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind)) as p:
            await p.send(frame)
            got = await p.until_closed()
            assert not any(isinstance(m, Welcome) for m in got), got


async def test_small_max_message_size_then_a_bus_snapshot(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True, max_message_size=256) as p:
            reply = await p.request(pack(SNAPSHOT, 1, True))
            assert reply.request_id == 1


async def test_silent_and_half_sent_hellos_do_not_block_others(backend, kind):
    """Slowloris before the handshake: connections that say nothing or half a Hello."""
    async with sentinel(backend, kind) as watch:
        streams = [await open_raw_socket(backend.address(kind)) for _ in range(20)]
        frame = encode_frame(hello())
        for i, stream in enumerate(streams):
            if i % 2:
                await stream.send_all(frame[: len(frame) // 2])
        # guest0 keeps working while they sit there (the sentinel probes throughout).
        probes = watch.probes
        with trio.fail_after(10):
            while watch.probes < probes + 5:
                await trio.sleep(0.02)
        for stream in streams:
            await stream.aclose()
