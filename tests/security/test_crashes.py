"""Issue 8, crashes 1-5: one guest must never end the backend for every guest.

Each test reproduces one crash against an in-process backend, over every
transport where it applies, and then checks what the fix promises: the
attacker gets a clear answer (or a Goodbye), the backend's counters say what
happened, and a well-behaved guest is served afterwards. On the code before
the fixes each of them ended the whole service (the exception escaped
``Backend.serve``).

The fixes are at the depth of each crash (the protocol's ``can_send`` and
``send_reply``, the handshake, the session's one send path); the containment
net in ``Backend._serve_connection`` is tested on its own with a broken
transport plugin (crash 5), and the other tests assert that the net was *not*
needed (``connections_crashed == 0``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

import pcifront
from pciback.config import parse_config
from pciback.service import Backend
from pciback.testing import TEST_TOKEN, RunningBackend, running_backend
from shared.errors import ErrorCode
from shared.protocol import (
    ConfigReadRequest,
    Connection,
    DmaUnmapRequest,
    ErrorReply,
    Goodbye,
    Limits,
    Message,
    PingRequest,
    Role,
    SnapshotRequest,
    Welcome,
    decode,
)
from shared.transport import (
    FrameListener,
    FrameTransport,
    TransportOptions,
    TransportScheme,
    open_listener,
    open_transport,
    register_transport,
)
from tests.support.configs import edu_config

CONFIG = edu_config(
    ["guest0", "attacker"], {"edu0": "guest0", "edu1": "attacker", "edu2": "attacker"}
)

KINDS = ["unix", "shm", "tcp"]


def raw(*fields: Any) -> bytes:
    """A frame payload with arbitrary (possibly invalid) fields."""
    return bytes(msgpack.packb(list(fields)))


@asynccontextmanager
async def attacker(
    rb: RunningBackend, kind: str, *, limits: Limits | None = None
) -> AsyncIterator[tuple[FrameTransport, Connection]]:
    """A raw frontend that completed its handshake as guest 'attacker'."""
    limits = limits or Limits()
    transport = await open_transport(rb.address(kind), TransportOptions())
    async with transport:
        conn = Connection(Role.CLIENT, limits=limits, guest="attacker")
        await transport.send_frame(conn.hello(TEST_TOKEN))  # tcp:// guests prove who they are
        assert isinstance(conn.receive(await transport.receive_frame()), Welcome)
        transport.set_max_frame_size(conn.frame_size)
        await transport.start_session(is_server=False, max_frame_size=conn.frame_size)
        yield transport, conn


async def until_closed(transport: FrameTransport) -> list[Message]:
    """Everything the backend sends before it closes the connection (bounded in time)."""
    got: list[Message] = []
    with trio.fail_after(10):
        while True:
            try:
                frame = await transport.receive_frame()
            except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                return got
            got.append(decode(frame, max_size=1 << 24))


async def still_serves_others(rb: RunningBackend, kind: str) -> None:
    """A well-behaved guest connects and gets correct answers; nothing was contained."""
    async with pcifront.connect(rb.address(kind), guest="guest0", token=TEST_TOKEN) as bus:
        assert await bus.devices[0].config_read(0, 4) == 0x11E81234
    assert rb.backend.statistics().connections_crashed == 0


async def config_read_reply(transport: FrameTransport, conn: Connection) -> None:
    """The attacker's connection still works (one request, one correct reply)."""
    rid = conn.next_request_id()
    await transport.send_frame(conn.send(ConfigReadRequest(rid, 0, 0, 2)))
    with trio.fail_after(10):
        reply = conn.receive(await transport.receive_frame())
    assert reply == type(reply)(rid, 0x1234)


# --------------------------------------------------------------------------- crash 1


FATAL_FRAMES = {
    "id-minus-1": raw(PingRequest.TAG, -1),
    "tag-0x7f": raw(0x7F, 1),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fatal", sorted(FATAL_FRAMES))
async def test_error_reply_then_fatal_frame_in_one_write(
    kind: str, fatal: str, tmp_path: Path
) -> None:
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb:
        async with attacker(rb, kind) as (transport, _conn):
            # Offset 0x1000 is outside config space: answerable, an ErrorReply is queued.
            bad_read = raw(ConfigReadRequest.TAG, 7, 0, 0x1000, 4)
            await transport.send_frames([bad_read, FATAL_FRAMES[fatal]])
            got = await until_closed(transport)
        # The queued reply was dropped and counted; the guest is told why it is dropped.
        assert [type(m) for m in got] == [Goodbye], got
        assert got[0].code is ErrorCode.PROTOCOL_ERROR  # type: ignore[attr-defined]
        stats = rb.backend.statistics()
        assert stats.replies_dropped == 1
        assert stats.disconnects_for_misbehaviour == 1
        await still_serves_others(rb, kind)


@pytest.mark.parametrize("kind", KINDS)
async def test_ping_then_goodbye_in_one_write(kind: str, tmp_path: Path) -> None:
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb:
        async with attacker(rb, kind) as (transport, conn):
            ping = conn.send(PingRequest(conn.next_request_id()))
            await transport.send_frames([ping, conn.close()])
            assert await until_closed(transport) == []
        assert rb.backend.statistics().replies_dropped == 1
        assert rb.backend.statistics().disconnects_for_misbehaviour == 0  # a Goodbye is fine
        await still_serves_others(rb, kind)


@pytest.mark.parametrize("kind", KINDS)
async def test_two_pings_with_the_same_id_in_one_write(kind: str, tmp_path: Path) -> None:
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb:
        async with attacker(rb, kind) as (transport, _conn):
            await transport.send_frames([raw(PingRequest.TAG, 5), raw(PingRequest.TAG, 5)])
            got = await until_closed(transport)
        assert [type(m) for m in got] == [Goodbye], got
        assert "reused request id 5" in got[0].message  # type: ignore[attr-defined]
        assert rb.backend.statistics().replies_dropped == 1
        await still_serves_others(rb, kind)


@pytest.mark.parametrize("kind", KINDS)
async def test_frontend_cancelling_reads_then_leaving(kind: str, tmp_path: Path) -> None:
    """The ordinary program of the issue: 8 reads in a nursery, cancel it, leave."""
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb:
        for _ in range(3):
            async with pcifront.connect(
                rb.address(kind), guest="attacker", token=TEST_TOKEN
            ) as bus:
                edu = bus.devices[0]
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(edu.config_read, 4 * i, 4)
                    await trio.sleep(0)  # every read is sent...
                    nursery.cancel_scope.cancel()  # ...and abandoned before its reply
        await still_serves_others(rb, kind)


# --------------------------------------------------------------------------- crash 2


@pytest.mark.parametrize("kind", KINDS)
async def test_goodbye_as_the_first_frame(kind: str, tmp_path: Path) -> None:
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb:
        transport = await open_transport(rb.address(kind), TransportOptions())
        async with transport:
            await transport.send_frame(raw(Goodbye.TAG, 0, "no hello"))
            assert await until_closed(transport) == []
        stats = rb.backend.statistics()
        assert stats.handshakes_rejected == 0 and stats.protocol_errors == 0
        await still_serves_others(rb, kind)


# --------------------------------------------------------------------------- crash 3


@pytest.mark.parametrize("kind", KINDS)
async def test_small_max_message_size_then_a_bus_snapshot(kind: str, tmp_path: Path) -> None:
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb:
        async with attacker(rb, kind, limits=Limits(256, 8)) as (transport, conn):
            rid = conn.next_request_id()
            await transport.send_frame(conn.send(SnapshotRequest(rid, include_config=True)))
            with trio.fail_after(10):
                frame = await transport.receive_frame()
            assert len(frame) <= 256
            reply = conn.receive(frame)
            assert isinstance(reply, ErrorReply) and reply.request_id == rid
            assert reply.code is ErrorCode.OPERATION_FAILED
            assert "SnapshotReply" in reply.message and "accepts at most 256" in reply.message
            # The connection goes on: a reply that fits still comes back whole.
            await config_read_reply(transport, conn)
        await still_serves_others(rb, kind)


# --------------------------------------------------------------------------- crash 4


@pytest.mark.parametrize("kind", KINDS)
async def test_unmap_answered_after_the_connection_failed(kind: str, tmp_path: Path) -> None:
    """The unmap is answered from a task; a fatal frame right behind it ends the connection."""
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb:
        async with attacker(rb, kind) as (transport, conn):
            unmap = conn.send(DmaUnmapRequest(conn.next_request_id(), 0x1_0000_0000))
            await transport.send_frames([unmap, FATAL_FRAMES["tag-0x7f"]])
            got = await until_closed(transport)
        assert [type(m) for m in got] == [Goodbye], got
        assert rb.backend.statistics().replies_dropped == 1
        await still_serves_others(rb, kind)


@pytest.mark.parametrize("kind", ["unix"])
async def test_unmap_still_answered_on_an_open_connection(kind: str, tmp_path: Path) -> None:
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp_path) as rb:
        async with attacker(rb, kind) as (transport, conn):
            rid = conn.next_request_id()
            await transport.send_frame(conn.send(DmaUnmapRequest(rid, 0x1_0000_0000)))
            with trio.fail_after(10):
                reply = conn.receive(await transport.receive_frame())
            assert isinstance(reply, ErrorReply) and reply.request_id == rid
            assert rb.backend.statistics().replies_dropped == 0


# --------------------------------------------------------------------------- crash 5


class _Flaky(FrameTransport):
    """A plugin's transport that fails to describe its peer (delegates everything else)."""

    def __init__(self, inner: FrameTransport) -> None:
        self.inner = inner

    async def send_frame(self, frame: bytes) -> None:
        await self.inner.send_frame(frame)

    async def receive_frame(self) -> bytes:
        return await self.inner.receive_frame()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def describe(self) -> str:
        raise RuntimeError("flaky plugin: cannot describe this peer")


class _FlakyListener(FrameListener):
    """Accepts through the memory transport; the first accept itself fails."""

    def __init__(self, inner: FrameListener) -> None:
        self.inner = inner
        self.address = inner.address.replace("memory:", "flaky-test:", 1)
        self.accepts = 0

    async def accept(self) -> FrameTransport:
        transport = await self.inner.accept()
        self.accepts += 1
        if self.accepts == 1:
            await transport.aclose()
            raise ValueError("flaky plugin: the peer's address cannot be described")
        return _Flaky(transport)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _listen_flaky(rest: str, options: TransportOptions) -> FrameListener:
    return _FlakyListener(await open_listener(f"memory:{rest}", options))


async def _connect_flaky(rest: str, options: TransportOptions) -> FrameTransport:
    return await open_transport(f"memory:{rest}", options)


register_transport(TransportScheme("flaky-test", _connect_flaky, _listen_flaky), replace=True)


async def _start(nursery: trio.Nursery, listen: Sequence[str], tmp: Path) -> Backend:
    config = replace(parse_config(CONFIG, base=tmp), listen=tuple(listen))
    backend = Backend(config)
    await nursery.start(backend.serve)
    return backend


async def test_plugin_failing_to_describe_a_peer_ends_only_that_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = f"unix:{tmp_path / 'good.sock'}"
    caplog.set_level(logging.INFO, logger="pcisplit.backend")
    async with trio.open_nursery() as nursery:
        backend = await _start(nursery, ["flaky-test:crash5", good], tmp_path)
        async with pcifront.connect(good, guest="guest0") as bystander:
            # The listener's accept() fails once: that connection attempt is lost.
            first = await open_transport("flaky-test:crash5")
            async with first:
                with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                    with trio.fail_after(10):
                        await first.receive_frame()
            # The next connection's transport cannot describe itself: it ends at once.
            second = await open_transport("flaky-test:crash5")
            async with second:
                with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                    with trio.fail_after(10):
                        await second.receive_frame()
            stats = backend.statistics()
            assert (stats.accept_failures, stats.connections_crashed) == (1, 1)
            assert stats.connections_active == 1  # only the bystander
            # Everyone else never noticed.
            assert await bystander.devices[0].config_read(0, 4) == 0x11E81234
        async with pcifront.connect(good, guest="guest0") as later:
            assert await later.devices[0].config_read(0, 2) == 0x1234
        nursery.cancel_scope.cancel()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Each failure is logged once, at error level, with its traceback.
    assert len(errors) == 2, [r.getMessage() for r in errors]
    assert all(r.exc_info is not None for r in errors)
    assert "cannot describe this peer" in str(errors[1].exc_info[1])  # type: ignore[index]
