"""Every blocking transport passes the blocking conformance suite, against the trio peer.

``vsock://`` runs where loopback vsock (CID 1) answers. The last tests check
the kit itself: it catches a transport that breaks the rules.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from shared.transport import (
    BlockingStreamTransport,
    BlockingTransport,
    FrameTransport,
    PeerIdentity,
    TransportAddressError,
    TransportOptions,
    open_blocking_transport,
    open_listener,
)
from shared.transport._sockets import vsock_loopback_problem
from shared.transport.blocking_conformance import (
    CHECKS,
    BlockingTransportConformance,
    run_blocking_conformance,
)
from shared.transport.conformance import ConformanceFailure
from tests.support.tls import transport_options

Connect = Callable[[str, TransportOptions], BlockingTransport]


@asynccontextmanager
async def _blocking_pair(
    address: str,
    max_frame_size: int,
    server_opts: TransportOptions | None = None,
    client_opts: TransportOptions | None = None,
    *,
    session: bool = False,
    connect: Connect = open_blocking_transport,
) -> AsyncIterator[tuple[BlockingTransport, FrameTransport]]:
    """A blocking client connected to a trio listener's end (``session``: start shm's ring)."""
    server_opts = server_opts or TransportOptions()
    client_opts = client_opts or TransportOptions()
    server_opts.max_frame_size = client_opts.max_frame_size = max_frame_size
    listener = await open_listener(address, server_opts)
    try:
        accepted: list[FrameTransport] = []
        async with trio.open_nursery() as nursery:

            async def accept_one() -> None:
                server = await listener.accept()
                await server.do_handshake()  # TLS: the client's connect waits for it
                accepted.append(server)

            nursery.start_soon(accept_one)
            client = await trio.to_thread.run_sync(connect, listener.address, client_opts)
        server = accepted[0]
        try:
            if session:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        lambda: server.start_session(is_server=True, max_frame_size=max_frame_size)
                    )
                    await trio.to_thread.run_sync(client.start_session, max_frame_size)
            yield client, server
        finally:
            client.close()
            await server.aclose()
    finally:
        await listener.aclose()


class _LocalUnixPeer(BlockingTransportConformance):
    """unix: and shm: know their peer from SO_PEERCRED: here, this very process."""

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.path = tmp_path / "t.sock"

    def check_peer_identity(self, identity: PeerIdentity) -> None:
        assert identity.pid == os.getpid()
        assert identity.uid == os.geteuid()
        assert identity.gid == os.getegid()


class TestBlockingUnixConformance(_LocalUnixPeer):
    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair(f"unix:{self.path}", max_frame_size)


class TestBlockingShmConformance(_LocalUnixPeer):
    """shm: after the session started: frames on the ring, the socket for liveness."""

    poll_us: float | None = None

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair(
            f"shm:{self.path}",
            max_frame_size,
            client_opts=TransportOptions(poll_us=self.poll_us),
            session=True,
        )


class TestBlockingShmPollingConformance(TestBlockingShmConformance):
    """The same contract with the receiver spinning on the ring first."""

    poll_us = 50.0


class TestBlockingShmSocketPhaseConformance(_LocalUnixPeer):
    """shm: before its session starts (the handshake): frames and fds on the socket."""

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair(f"shm:{self.path}", max_frame_size)


class _Loopback(BlockingTransportConformance):
    def check_peer_identity(self, identity: PeerIdentity) -> None:
        assert identity.address is not None and identity.address.startswith("127.0.0.1:")
        assert identity.uid is None  # a TCP peer proves no credentials


class TestBlockingTcpConformance(_Loopback):
    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair("tcp://127.0.0.1:0", max_frame_size)


class TestBlockingTlsConformance(_Loopback):
    @pytest.fixture(autouse=True)
    def _certs(self) -> None:
        self.server_opts, self.client_opts = transport_options()

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair(
            "tls://127.0.0.1:0", max_frame_size, self.server_opts, self.client_opts
        )


_VSOCK_SKIP = vsock_loopback_problem()


@pytest.mark.skipif(_VSOCK_SKIP is not None, reason=str(_VSOCK_SKIP))
class TestBlockingVsockConformance(BlockingTransportConformance):
    def check_peer_identity(self, identity: PeerIdentity) -> None:
        assert identity.address is not None and identity.address.startswith("1:")
        assert identity.uid is None

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair("vsock://1:0", max_frame_size)


def test_blocking_vsock_addresses_are_checked_before_connecting() -> None:
    for bad in ("vsock:1:5000", "vsock://1", "vsock://one:5000", "vsock://1:port"):
        with pytest.raises(TransportAddressError, match="vsock"):
            open_blocking_transport(bad, TransportOptions())


# --------------------------------------------------------------------------- the kit itself


class _Unguarded(BlockingStreamTransport):
    """Lets two threads receive at once (no ConflictDetector): the kit must notice."""

    def __init__(self, sock: socket.socket, max_frame_size: int, *, name: str) -> None:
        super().__init__(sock, max_frame_size, name=name)
        self._inside = 0

    @property
    def receiving(self) -> bool:
        return self._inside > 0

    def receive_frame(self, deadline: float | None = None) -> bytes | None:
        self._inside += 1
        try:
            return self._receive_stream(deadline)
        finally:
            self._inside -= 1


class _Truncating(BlockingStreamTransport):
    """Drops the last byte of every frame over 100 bytes: the kit must notice."""

    def send_frame(self, frame: bytes, fds: list[int] | None = None) -> None:
        super().send_frame(frame[:-1] if len(frame) > 100 else frame, fds)


def _connect_as(cls: type[BlockingStreamTransport]) -> Connect:
    def connect(address: str, options: TransportOptions) -> BlockingTransport:
        path = address.removeprefix("unix:")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock, options.max_frame_size, name=address)

    return connect


def _suite(tmp_path: Path, cls: type[BlockingStreamTransport]) -> BlockingTransportConformance:
    suite = BlockingTransportConformance()
    suite.make_pair = lambda size: _blocking_pair(  # type: ignore[method-assign]
        f"unix:{tmp_path / 'broken.sock'}", size, connect=_connect_as(cls)
    )
    return suite


def _failures(exc: BaseException) -> list[str]:
    """The ConformanceFailure texts in ``exc``, which a nursery may have grouped."""
    if isinstance(exc, BaseExceptionGroup):
        return [text for inner in exc.exceptions for text in _failures(inner)]
    return [str(exc)] if isinstance(exc, ConformanceFailure) else []


async def _fails(check: Callable[[], Awaitable[None]], rule: str) -> None:
    try:
        await check()
    except BaseException as exc:  # inspected below, re-raised if not the rule
        if not any(rule in text for text in _failures(exc)):
            raise
        return
    raise AssertionError(f"the kit passed a transport that breaks {rule!r}")


async def test_the_kit_catches_a_transport_without_busy_detection(tmp_path: Path) -> None:
    suite = _suite(tmp_path, _Unguarded)
    await _fails(suite.test_two_receivers_at_once_is_busy, "second thread receiving")


async def test_the_kit_catches_a_transport_that_changes_frames(tmp_path: Path) -> None:
    suite = _suite(tmp_path, _Truncating)
    await _fails(suite.test_ordering_both_directions, "changed or reordered")


async def test_the_kit_runs_without_pytest(tmp_path: Path) -> None:
    passed = await run_blocking_conformance(
        lambda size: _blocking_pair(f"unix:{tmp_path / 'plain.sock'}", size)
    )
    assert passed == CHECKS
