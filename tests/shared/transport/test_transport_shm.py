"""The shm: transport: bootstrap over a UNIX socket, frames on the ring, peer death."""

from __future__ import annotations

import array
import fcntl
import os
import re
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from shared.errors import LimitExceededError
from shared.protocol._framing import encode_frame
from shared.transport import (
    FrameTooLargeError,
    FrameTransport,
    TransportOptions,
    open_listener,
    open_transport,
)
from shared.transport._shm import ShmTransport
from shared.transport._shm_listen import connect_shm, listen_shm
from shared.transport._stream import UnixFrameTransport
from shared.transport.conformance import TransportConformance

ROOT = Path(__file__).resolve().parents[3]


@asynccontextmanager
async def shm_pair(
    max_frame_size: int = 64 * 1024, **option_kwargs: object
) -> AsyncIterator[tuple[ShmTransport, ShmTransport]]:
    """A connected (client, server) pair with the session already on the ring."""
    with tempfile.TemporaryDirectory(prefix="pcisplit-shm-") as tmp:
        path = os.path.join(tmp, "s.sock")
        options = TransportOptions(max_frame_size=max_frame_size, **option_kwargs)  # type: ignore[arg-type]
        listener = await listen_shm(path, options)
        async with listener:
            client = await connect_shm(path, options)
            server = await listener.accept()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: server.start_session(is_server=True, max_frame_size=max_frame_size)
                )
                await client.start_session(is_server=False, max_frame_size=max_frame_size)
            try:
                yield client, server
            finally:
                await client.aclose()
                await server.aclose()


class TestShmConformance(TransportConformance):
    def make_pair(
        self, max_frame_size: int
    ) -> AbstractAsyncContextManager[tuple[FrameTransport, FrameTransport]]:
        return shm_pair(max_frame_size)


class TestShmConformancePolling(TransportConformance):
    """The same contract with adaptive polling switched on."""

    def make_pair(
        self, max_frame_size: int
    ) -> AbstractAsyncContextManager[tuple[FrameTransport, FrameTransport]]:
        return shm_pair(max_frame_size, poll_us=20.0)


async def test_handshake_runs_on_the_socket_then_frames_move_to_the_ring(tmp_path: Path) -> None:
    path = str(tmp_path / "h.sock")
    options = TransportOptions(max_frame_size=4096)
    listener = await listen_shm(path, options)
    async with listener:
        client = await connect_shm(path, options)
        server = await listener.accept()
        assert listener.address == f"shm:{path}"
        # Handshake stand-in: ordinary frames over the UNIX socket.
        await client.send_frame(b"hello")
        assert await server.receive_frame() == b"hello"
        await server.send_frame(b"welcome")
        assert await client.receive_frame() == b"welcome"
        before = (client.can_pass_fds, client.session_started)
        assert before == (True, False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: server.start_session(is_server=True, max_frame_size=4096))
            await client.start_session(is_server=False, max_frame_size=4096)
        assert (client.session_started, server.session_started) == (True, True)
        assert server.peer_identity().pid == os.getpid()
        for i in range(50):
            await client.send_frame(b"c%d" % i)
            await server.send_frame(b"s%d" % i)
        assert [await server.receive_frame() for _ in range(50)] == [b"c%d" % i for i in range(50)]
        assert [await client.receive_frame() for _ in range(50)] == [b"s%d" % i for i in range(50)]
        assert client.statistics().frames_sent == 50
        assert server.statistics().frames_received == 50
        await client.aclose()
        await server.aclose()


async def test_many_frames_across_index_wrap_both_directions() -> None:
    # The rings start 4 KiB below 2**32, so the indices wrap early in the run.
    async with shm_pair(4096, ring_size=8192, extra={"shm_initial_index": 2**32 - 4096}) as (
        client,
        server,
    ):
        count = 2000

        async def pump(src: ShmTransport) -> None:
            for i in range(count):
                await src.send_frame(i.to_bytes(4, "little") * (i % 300))

        async def drain(dst: ShmTransport) -> None:
            for i in range(count):
                assert await dst.receive_frame() == i.to_bytes(4, "little") * (i % 300)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client)
            nursery.start_soon(pump, server)
            nursery.start_soon(drain, client)
            nursery.start_soon(drain, server)
        # Event indices suppress most doorbells while the peer is busy.
        assert client.statistics().doorbells_sent < count


async def test_over_the_limit_is_refused_and_transport_stays_usable() -> None:
    async with shm_pair(1000) as (client, server):
        with pytest.raises(FrameTooLargeError):
            await client.send_frame(b"x" * 1001)
        await client.send_frame(b"y" * 1000)
        assert await server.receive_frame() == b"y" * 1000
        with pytest.raises(FrameTooLargeError):
            client.set_max_frame_size(2000)  # the ring was sized for 1000


async def test_batch_sends_one_doorbell() -> None:
    async with shm_pair(4096) as (client, server):
        async with trio.open_nursery() as nursery:
            received: list[bytes] = []

            async def reader() -> None:
                for _ in range(20):
                    received.append(await server.receive_frame())

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()  # the server sleeps on its doorbell
            before = client.statistics().doorbells_sent
            await client.send_frames([b"%d" % i for i in range(20)])
            assert client.statistics().doorbells_sent == before + 1
        assert received == [b"%d" % i for i in range(20)]


async def test_pending_receive_gets_closed_error_on_our_close() -> None:
    async with shm_pair() as (client, _server):
        async with trio.open_nursery() as nursery:

            async def receiver() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await client.receive_frame()

            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()


async def test_frames_sent_before_a_clean_close_are_delivered_then_end_of_channel() -> None:
    async with shm_pair() as (client, server):
        for i in range(10):
            await client.send_frame(b"%d" % i)
        await client.aclose()
        assert [await server.receive_frame() for _ in range(10)] == [b"%d" % i for i in range(10)]
        with pytest.raises(trio.EndOfChannel):
            await server.receive_frame()
        with pytest.raises(trio.BrokenResourceError):
            await server.send_frame(b"to nobody")


async def test_corrupt_ring_breaks_only_that_connection() -> None:
    async with shm_pair() as (client, server), shm_pair() as (other_client, other_server):
        await client.send_frame(b"fine")
        assert await server.receive_frame() == b"fine"
        # The client turns hostile: its producer index jumps far ahead.
        session = client._session
        assert session is not None
        ctrl_offset = session.layout.ring_spec(0).ctrl_offset
        session.mm[ctrl_offset : ctrl_offset + 4] = (1 << 30).to_bytes(4, "little")
        with pytest.raises(trio.BrokenResourceError, match="more than the ring size ahead"):
            await server.receive_frame()
        with pytest.raises(trio.BrokenResourceError):
            await server.send_frame(b"x")  # the connection stays broken
        await other_client.send_frame(b"unaffected")
        assert await other_server.receive_frame() == b"unaffected"


async def test_send_timeout_disconnects_a_peer_that_never_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with shm_pair(4096, ring_size=8192, extra={"shm_send_timeout": 5.0}) as (client, _s):
        with pytest.raises(trio.BrokenResourceError, match=r"consumed nothing for 5\.0 s"):
            for _ in range(100):
                await client.send_frame(b"x" * 4000)
        assert client.statistics().frames_sent == 2  # two 4008-byte records fill 8 KiB


async def _bad_setup(tmp_path: Path, make_fds: object) -> str:
    """Offer a hand-made setup to a real server; return the server's error message."""
    path = str(tmp_path / "bad.sock")
    options = TransportOptions(max_frame_size=4096)
    async with await listen_shm(path, options) as listener:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(path)
        server = await listener.accept()
        payload, fds = make_fds()  # type: ignore[operator]
        raw.sendmsg(
            [encode_frame(payload)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
        )
        with pytest.raises(trio.BrokenResourceError) as info:
            await server.start_session(is_server=True, max_frame_size=4096)
        for fd in fds:
            os.close(fd)
        raw.close()
        await server.aclose()
    return str(info.value)


def _setup_payload(total: int, size: int = 8192, max_record: int = 4096) -> bytes:
    return struct.pack("<4sHHIIIQ", b"PSHM", 1, 0, size, size, max_record, total)


TOTAL = 4096 + 2 * 8192


async def test_server_rejects_an_unsealed_memfd(tmp_path: Path) -> None:
    def make() -> tuple[bytes, list[int]]:
        memfd = os.memfd_create("evil")
        os.ftruncate(memfd, TOTAL)
        return _setup_payload(TOTAL), [memfd, os.eventfd(0), os.eventfd(0)]

    assert "not sealed" in await _bad_setup(tmp_path, make)


async def test_server_rejects_a_pipe_as_doorbell(tmp_path: Path) -> None:
    def make() -> tuple[bytes, list[int]]:
        memfd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, TOTAL)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        read_end, write_end = os.pipe()
        return _setup_payload(TOTAL), [memfd, read_end, write_end]

    assert "not an eventfd" in await _bad_setup(tmp_path, make)


async def test_server_rejects_a_wrong_size_and_bad_geometry(tmp_path: Path) -> None:
    def wrong_size() -> tuple[bytes, list[int]]:
        memfd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, 4096)
        return _setup_payload(TOTAL), [memfd, os.eventfd(0), os.eventfd(0)]

    def bad_ring() -> tuple[bytes, list[int]]:
        return _setup_payload(4096 + 2 * 5000, size=5000), [
            os.memfd_create("x"), os.eventfd(0), os.eventfd(0)
        ]

    assert "memfd" in await _bad_setup(tmp_path, wrong_size)
    assert "power of two" in await _bad_setup(tmp_path, bad_ring)


async def test_listener_replaces_stale_socket_and_removes_its_file(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a dead server's leftover
    listener = await listen_shm(path, TransportOptions())
    assert os.path.exists(path)
    await listener.aclose()
    assert not os.path.exists(path)


# A client in another process: sets the session up, sends two frames, then waits
# to be killed (so its death, not a goodbye, is what the server sees).
CHILD = r"""
import sys, trio
from shared.transport import TransportOptions
from shared.transport._shm_listen import connect_shm

async def main():
    client = await connect_shm(sys.argv[1], TransportOptions(max_frame_size=4096))
    await client.start_session(is_server=False, max_frame_size=4096)
    await client.send_frame(b"one")
    await client.send_frame(b"two")
    await trio.sleep_forever()

trio.run(main)
"""


@pytest.mark.slow
async def test_peer_death_in_another_process_is_an_error_not_a_hang(tmp_path: Path) -> None:
    path = str(tmp_path / "death.sock")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    options = TransportOptions(max_frame_size=4096)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with await listen_shm(path, options) as listener, trio.open_nursery() as nursery:
        proc = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, str(script), path], env=env, check=False,
                task_status=task_status,
            )
        )
        server = await listener.accept()
        with trio.fail_after(30):
            await server.start_session(is_server=True, max_frame_size=4096)
            assert await server.receive_frame() == b"one"
            assert await server.receive_frame() == b"two"
            async with trio.open_nursery() as inner:

                async def expect_broken() -> None:
                    with pytest.raises(trio.BrokenResourceError, match="without saying goodbye"):
                        await server.receive_frame()

                inner.start_soon(expect_broken)
                await trio.testing.wait_all_tasks_blocked()
                proc.send_signal(signal.SIGKILL)
        await server.aclose()



# --------------------------------------------------------------------------- the control socket


@asynccontextmanager
async def limited_pair(
    kind: str, **server_limits: object
) -> AsyncIterator[tuple[FrameTransport, FrameTransport]]:
    """A (client, server) pair whose server has ``server_limits``; shm: already on the ring."""
    with tempfile.TemporaryDirectory(prefix="pcisplit-ctl-") as tmp:
        options = TransportOptions(max_frame_size=4096, **server_limits)  # type: ignore[arg-type]
        async with await open_listener(f"{kind}:{tmp}/c.sock", options) as listener:
            client = await open_transport(listener.address, TransportOptions(max_frame_size=4096))
            server = await listener.accept()
            if kind == "shm":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        lambda: server.start_session(is_server=True, max_frame_size=4096)
                    )
                    await client.start_session(is_server=False, max_frame_size=4096)
            try:
                yield client, server
            finally:
                await client.aclose()
                await server.aclose()


def control_of(transport: FrameTransport) -> UnixFrameTransport:
    """The UnixFrameTransport carrying ``transport``'s socket (itself on unix:)."""
    if isinstance(transport, ShmTransport):
        return transport.control
    assert isinstance(transport, UnixFrameTransport)
    return transport


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_a_partial_frame_on_the_socket_is_refused_by_the_unix_transport(
    kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    # After shm:'s session moved to the ring, its control socket still enforces
    # partial_frame_timeout, and the refusal is the composed unix: transport's own.
    async with limited_pair(kind, partial_frame_timeout=5.0) as (client, server):
        sock = control_of(client).stream.socket
        await sock.send(struct.pack("<I", 100) + b"half")  # 8 bytes of a 104-byte frame
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError) as info, trio.fail_after(60):
            await server.receive_frame()
        assert trio.current_time() - start == pytest.approx(5.0)
        cause = info.value.__cause__
        assert isinstance(cause, LimitExceededError)
        assert cause.limit == "partial_frame_timeout"
        unix_message = (
            f"{server.describe()}: peer sent 8 bytes of a frame and then nothing for 5.0 s; "
            "disconnecting it"
        )
        assert unix_message in str(info.value)
        # The control transport itself refused the peer, and says so from now on.
        with pytest.raises(trio.BrokenResourceError, match=re.escape(unix_message)):
            await control_of(server).receive_frame()


async def test_peer_identity_is_the_composed_unix_transports() -> None:
    async with shm_pair() as (client, server):
        for end in (client, server):
            control = end.control
            assert isinstance(control, UnixFrameTransport)
            identity = end.peer_identity()
            assert identity == control.peer_identity()
            raw = control.stream.socket.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            assert (identity.pid, identity.uid, identity.gid) == struct.unpack("3i", raw)
            assert identity.transport == end.describe()
