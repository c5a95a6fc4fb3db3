"""Malformed frames: every byte a guest sends is hostile (framing, msgpack, fields, ids).

Each attack runs while guest0 works (see ``conftest.sentinel``). A frame that
cannot be answered ends the attacker's connection (Goodbye, then close); a bad
request whose id is readable gets an ``ErrorReply`` and the connection goes on.
"""

from __future__ import annotations

import random

import msgpack
import pytest
import trio
from _hostile import (
    BAR_READ,
    CFG_READ,
    EDU1,
    PING,
    is_error,
    open_raw_socket,
    pack,
    peer,
    raw_handshake,
    stream_closed,
)
from conftest import sentinel

from shared.errors import ErrorCode
from shared.protocol import Goodbye, ValueReply


async def test_length_prefix_of_4_gib_before_the_handshake(backend, kind):
    async with sentinel(backend, kind):
        stream = await open_raw_socket(backend.address(kind))
        async with stream:
            await stream.send_all(b"\xff\xff\xff\xff" + b"x" * 64)
            assert await stream_closed(stream) == b""


@pytest.mark.parametrize("raw_kind", ["unix", "tcp"])
async def test_length_prefix_of_4_gib_after_the_handshake(backend, raw_kind):
    async with sentinel(backend, raw_kind):
        stream = await open_raw_socket(backend.address(raw_kind))
        async with stream:
            await raw_handshake(stream)
            await stream.send_all(b"\xff\xff\xff\x7f" + b"x" * 64)
            await stream_closed(stream)


async def test_garbage_frame_after_the_handshake_gets_goodbye(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            await p.send(b"\xc1\xc1 this is not msgpack")
            got = await p.until_closed()
            assert any(
                isinstance(m, Goodbye) and m.code is ErrorCode.PROTOCOL_ERROR for m in got
            ), got


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # empty frame
        msgpack.packb({"tag": PING, "id": 1}),  # a map, never used on the wire
        msgpack.packb([PING]),  # no request id
        msgpack.packb([PING, -1]),  # negative id
        msgpack.packb([PING, 2**32]),  # id over u32
        msgpack.packb([0x41, 1, 0]),  # a reply sent by the guest
        msgpack.packb([0x7F, 1]),  # event range, unknown tag
        msgpack.packb([0xFF, 1]),  # past every range
        msgpack.packb(["x", 1]),  # tag not an int
        b"\x91" * 5000 + b"\x90",  # 5000-deep nested arrays
        b"\xdd\xff\xff\xff\xff",  # array header claiming 4 billion items
        b"\xc6\xff\xff\xff\xff",  # bin header claiming 4 GiB
        b"\x92\x10\xcf" + b"\xff" * 8,  # u64 id
    ],
    ids=[
        "empty", "map", "no-id", "negative-id", "id-over-u32", "reply-from-guest",
        "unknown-event-tag", "tag-ff", "str-tag", "deep-nesting", "huge-array",
        "huge-bin", "u64-id",
    ],
)
async def test_unanswerable_frame_ends_only_that_connection(backend, kind, payload):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            await p.send(payload)
            got = await p.until_closed()
            assert all(not isinstance(m, ValueReply) for m in got), got


@pytest.mark.parametrize(
    "payload",
    [
        pack(CFG_READ, 7, EDU1, "zero", 4),  # offset of the wrong type
        pack(CFG_READ, 7, EDU1, 0, 4, 99),  # one field too many
        pack(CFG_READ, 7, EDU1, 0),  # one field too few
        pack(CFG_READ, 7, EDU1, 0x1000, 4),  # past the 4 KiB config space
        pack(CFG_READ, 7, EDU1, 1, 4),  # unaligned dword
        pack(CFG_READ, 7, EDU1, 0, 3),  # size 3
        pack(CFG_READ, 7, 0xFFFFFFFF, 0, 4),  # a device not on the bus
        pack(BAR_READ, 7, EDU1, 6, 0, 4),  # BAR index 6
        pack(BAR_READ, 7, EDU1, 0, 2**63, 4),  # offset far past the BAR
        pack(0x3F, 7),  # request range, unknown tag
    ],
    ids=[
        "str-offset", "extra-field", "missing-field", "offset-4k", "unaligned", "size-3",
        "foreign-device", "bar-6", "bar-offset-2^63", "unknown-request-tag",
    ],
)
async def test_bad_request_gets_an_error_reply_and_the_connection_goes_on(
    backend, kind, payload
):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            reply = await p.request(payload)
            assert is_error(reply), reply
            assert reply.request_id == 7
            # Still usable: a good request right after gets its real answer.
            good = await p.request(pack(CFG_READ, 8, EDU1, 0, 4))
            assert isinstance(good, ValueReply) and good.value == 0x11E81234, good


async def test_seeded_random_frames(backend, kind):
    seed = random.randrange(2**32)
    print(f"random frame seed: {seed}")
    rng = random.Random(seed)
    async with sentinel(backend, kind):
        for _ in range(20):
            async with peer(backend.address(kind), handshake=True) as p:
                prefix = rng.choice([b"", b"\x92\x12", b"\x95\x12\x01", b"\x93", b"\xdc\x00\x10"])
                await p.send(prefix + rng.randbytes(rng.randrange(0, 200)))
                with trio.move_on_after(0.5):
                    await p.until_closed()


# -- issue 8, crash 1: a reply queued before a fatal frame in the same read --------------


@pytest.mark.parametrize(
    "fatal",
    [pack(PING, -1), pack(0x7F, 1), pack(0x04, 0, "bye")],
    ids=["id-minus-1", "tag-7f", "goodbye"],
)
async def test_error_reply_then_fatal_frame_in_one_write(backend, kind, fatal):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            await p.send_many([pack(CFG_READ, 1, EDU1, 0x1000, 4), fatal])
            await p.until_closed()


async def test_two_pings_with_the_same_id_in_one_write(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            await p.send_many([pack(PING, 5), pack(PING, 5)])
            await p.until_closed()
