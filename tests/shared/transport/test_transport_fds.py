"""File-descriptor passing on unix: and shm: (before and after the session moved to the ring)."""

from __future__ import annotations

import array
import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from shared.protocol._framing import encode_frame
from shared.transport import (
    FdPassingUnsupportedError,
    FrameTransport,
    TransportOptions,
    memory_transport_pair,
    open_listener,
    open_transport,
)
from shared.transport._fdpass import FDS_PER_MESSAGE, MAX_FDS_PER_FRAME
from shared.transport._shm import ShmTransport
from shared.transport._stream import UnixFrameTransport


def open_fds() -> set[int]:
    """Our open fds, without the one listdir used to read /proc/self/fd (closed by now)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue
        found.add(int(name))
    return found


@asynccontextmanager
async def connected(
    kind: str, *, start_session: bool = False
) -> AsyncIterator[tuple[FrameTransport, FrameTransport]]:
    with tempfile.TemporaryDirectory(prefix="pcisplit-fds-") as tmp:
        options = TransportOptions(max_frame_size=65536)
        listener = await open_listener(f"{kind}:{tmp}/t.sock", options)
        async with listener:
            accepted: list[FrameTransport] = []
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    accepted.append(await listener.accept())

                nursery.start_soon(accept)
                client = await open_transport(listener.address, TransportOptions(65536))
            server = accepted[0]
            if start_session:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        lambda: server.start_session(is_server=True, max_frame_size=65536)
                    )
                    await client.start_session(is_server=False, max_frame_size=65536)
            try:
                yield client, server
            finally:
                await client.aclose()
                await server.aclose()


SETUPS = [("unix", False), ("shm", False), ("shm", True)]
IDS = ["unix", "shm-socket", "shm-ring"]


def same_eventfd(mine: int, theirs: int) -> bool:
    """True if ``theirs`` is a duplicate of eventfd ``mine`` (a write to one shows in the other)."""
    os.eventfd_write(mine, 7)
    try:
        return os.eventfd_read(theirs) == 7
    except BlockingIOError:
        os.eventfd_read(mine)
        return False


@pytest.mark.parametrize(("kind", "ring"), SETUPS, ids=IDS)
async def test_fds_arrive_with_their_frame(kind: str, ring: bool) -> None:
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with connected(kind, start_session=ring) as (client, server):
            assert client.can_pass_fds and server.can_pass_fds
            await client.send_frame(b"plain-1")
            await client.send_frame_with_fds(b"with-a", [a])
            await client.send_frame(b"plain-2")
            await client.send_frame_with_fds(b"with-b-and-a", [b, a])
            got: dict[bytes, list[int]] = {}
            for _ in range(4):
                frame = await server.receive_frame()
                got[frame] = server.take_received_fds()
            assert got[b"plain-1"] == [] and got[b"plain-2"] == []
            (fa,) = got[b"with-a"]
            fb, fa2 = got[b"with-b-and-a"]
            assert same_eventfd(a, fa) and same_eventfd(b, fb) and same_eventfd(a, fa2)
            # Received fds are close-on-exec from the start (MSG_CMSG_CLOEXEC).
            assert not os.get_inheritable(fa)
            # Taken twice: the second take is empty (the caller owns them now).
            assert server.take_received_fds() == []
            for fd in (fa, fb, fa2):
                os.close(fd)
            # The sender kept its own fds.
            os.eventfd_write(a, 1)
            assert os.eventfd_read(a) == 1
    finally:
        os.close(a)
        os.close(b)


@pytest.mark.parametrize(("kind", "ring"), SETUPS, ids=IDS)
async def test_untaken_fds_are_closed_at_the_next_frame(kind: str, ring: bool) -> None:
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with connected(kind, start_session=ring) as (client, server):
            before = open_fds()
            await client.send_frame_with_fds(b"ignored", [a, a, a])
            assert await server.receive_frame() == b"ignored"
            arrived = open_fds() - before
            assert len(arrived) == 3
            await client.send_frame(b"next")
            await client.send_frame_with_fds(b"ignored-at-close", [a])
            assert await server.receive_frame() == b"next"
            assert not arrived & open_fds(), "untaken fds were not closed"
            assert server.take_received_fds() == []
            assert await server.receive_frame() == b"ignored-at-close"
            held = open_fds() - before
            assert len(held) == 1
        assert not held & open_fds(), "fds held at close were not closed"
    finally:
        os.close(a)


@pytest.mark.parametrize(("kind", "ring"), SETUPS, ids=IDS)
async def test_more_fds_than_one_sendmsg_carries(kind: str, ring: bool) -> None:
    count = FDS_PER_MESSAGE * 2 + 5  # three sendmsg pieces
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with connected(kind, start_session=ring) as (client, server):
            await client.send_frame_with_fds(b"many", [a] * count)
            await client.send_frame(b"after")
            assert await server.receive_frame() == b"many"
            fds = server.take_received_fds()
            assert len(fds) == count
            assert same_eventfd(a, fds[-1])
            for fd in fds:
                os.close(fd)
            assert await server.receive_frame() == b"after"
            assert server.take_received_fds() == []
    finally:
        os.close(a)


@pytest.mark.parametrize(("kind", "ring"), SETUPS, ids=IDS)
async def test_too_many_fds_on_one_frame_breaks_the_connection(kind: str, ring: bool) -> None:
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with connected(kind, start_session=ring) as (client, server):
            before = open_fds()
            # A hostile peer: raw sendmsg pieces past the per-frame cap.
            data = (b"PSHM-FDS" + (0).to_bytes(8, "little")) if ring else b"x" * 64
            encoded = encode_frame(data)
            # A dup shares the (non-blocking) file status: never make it blocking, or the
            # transport's own reads would block the whole event loop.
            raw = socket.socket(fileno=os.dup(_socket_fd(client)))
            try:
                remaining = MAX_FDS_PER_FRAME + 1
                offset = 0
                while remaining:
                    group = min(remaining, FDS_PER_MESSAGE)
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [a] * group))]
                    raw.sendmsg([encoded[offset : offset + 1]], rights)
                    offset += 1
                    remaining -= group
                raw.sendall(encoded[offset:])
            finally:
                raw.close()
            with pytest.raises(trio.BrokenResourceError, match="file descriptors"):
                with trio.fail_after(10):
                    await server.receive_frame()
            assert open_fds() <= before, "fds of a rejected frame leaked"
    finally:
        os.close(a)


def _socket_fd(transport: FrameTransport) -> int:
    if isinstance(transport, ShmTransport):
        return transport.control.stream.socket.fileno()  # type: ignore[attr-defined,no-any-return]
    return transport.stream.socket.fileno()  # type: ignore[attr-defined,no-any-return]


async def test_transports_without_fd_passing_say_so() -> None:
    a, b = memory_transport_pair()
    async with a, b:
        assert not a.can_pass_fds
        with pytest.raises(FdPassingUnsupportedError, match="cannot pass file descriptors"):
            await a.send_frame_with_fds(b"x", [0])
        assert b.take_received_fds() == []


async def test_bad_fd_arguments_are_refused_before_sending() -> None:
    async with connected("unix") as (client, server):
        with pytest.raises(ValueError, match="between 1 and"):
            await client.send_frame_with_fds(b"x", [])
        with pytest.raises(ValueError, match="not a file descriptor"):
            await client.send_frame_with_fds(b"x", [-1])
        with pytest.raises(ValueError, match="cannot carry"):
            await client.send_frame_with_fds(b"", [0] * (FDS_PER_MESSAGE * 5))
        await client.send_frame(b"still fine")
        assert await server.receive_frame() == b"still fine"


async def test_receive_frame_with_fds_gives_every_frame_its_own_fds() -> None:
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with connected("unix") as (client, server):
            assert isinstance(server, UnixFrameTransport)
            await client.send_frame_with_fds(b"with", [a, a])
            await client.send_frame(b"without")
            frame, fds = await server.receive_frame_with_fds()
            assert frame == b"with" and len(fds) == 2 and all(same_eventfd(a, fd) for fd in fds)
            assert await server.receive_frame_with_fds() == (b"without", [])
            assert not set(fds) - open_fds(), "fds the caller took were closed under it"
            for fd in fds:
                os.close(fd)
    finally:
        os.close(a)


async def test_send_frame_nowait_writes_whole_frames_or_nothing() -> None:
    async with connected("unix") as (client, server):
        assert isinstance(client, UnixFrameTransport)
        assert client.send_frame_nowait(b"bye")
        assert await server.receive_frame() == b"bye"
        sent = 0
        while client.send_frame_nowait(b"%08d" % sent):  # until the socket buffer is full
            sent += 1
            assert sent < 1_000_000, "the socket never filled up"
        # Refused when full, yet the stream is still framed and usable.
        assert [await server.receive_frame() for _ in range(sent)] == [
            b"%08d" % i for i in range(sent)
        ]
        await client.send_frame(b"still framed")
        assert await server.receive_frame() == b"still framed"
        await client.aclose()
        assert not client.send_frame_nowait(b"after close")


async def test_shm_peer_gone_mid_frame_leaves_no_fds_behind() -> None:
    # After session start the control socket's only reader is the liveness task;
    # fds of a control frame the peer never finished are closed once it is gone,
    # not only when the transport closes.
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        async with connected("shm", start_session=True) as (client, server):
            assert isinstance(client, ShmTransport)
            before = open_fds()
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [a, a]))]
            raw = socket.socket(fileno=os.dup(client.control.stream.socket.fileno()))
            raw.sendmsg([struct.pack("<I", 100) + b"half"], rights)
            raw.close()
            await client.aclose()  # EOF in the middle of that frame
            with pytest.raises(trio.BrokenResourceError, match="middle of a frame"):
                with trio.fail_after(10):
                    await server.receive_frame()
            assert open_fds() <= before, "fds of an unfinished control frame are still open"
    finally:
        os.close(a)
