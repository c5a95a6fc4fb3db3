"""Every blocking transport passes the blocking conformance suite.

The client end is the blocking transport (``open_blocking_transport``); the
other end is the trio listener a backend would run, on its own thread
(``trio_peer_pair``). ``vsock://`` runs where loopback vsock (CID 1) answers.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme

from shared.transport import (
    BlockingStreamTransport,
    PeerIdentity,
    TransportAddressError,
    TransportOptions,
    open_blocking_transport,
)
from shared.transport._sockets import vsock_loopback_problem
from shared.transport.blocking_conformance import (
    CHECKS,
    BlockingConformanceFailure,
    BlockingTransportConformance,
    TrioPeer,
    run_blocking_conformance,
    trio_peer_pair,
)


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
        return trio_peer_pair(f"unix:{self.path}", max_frame_size)


class TestBlockingShmConformance(_LocalUnixPeer):
    """shm: after the session started: frames on the ring, the socket for liveness."""

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return trio_peer_pair(f"shm:{self.path}", max_frame_size, session=True)


class TestBlockingShmSocketPhaseConformance(_LocalUnixPeer):
    """shm: before the session starts (the handshake): frames and fds on the socket."""

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return trio_peer_pair(f"shm:{self.path}", max_frame_size)


class _Loopback(BlockingTransportConformance):
    def check_peer_identity(self, identity: PeerIdentity) -> None:
        assert identity.address is not None and identity.address.startswith("127.0.0.1:")
        assert identity.uid is None  # a TCP peer proves no credentials


class TestBlockingTcpConformance(_Loopback):
    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return trio_peer_pair("tcp://127.0.0.1:0", max_frame_size)


_VSOCK_SKIP = vsock_loopback_problem()


@pytest.mark.skipif(_VSOCK_SKIP is not None, reason=str(_VSOCK_SKIP))
class TestBlockingVsockConformance(BlockingTransportConformance):
    def check_peer_identity(self, identity: PeerIdentity) -> None:
        assert identity.address is not None and identity.address.startswith("1:")
        assert identity.uid is None

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return trio_peer_pair("vsock://1:0", max_frame_size)


def test_blocking_vsock_addresses_are_checked_before_connecting() -> None:
    for bad in ("vsock:1:5000", "vsock://1", "vsock://one:5000", "vsock://1:port"):
        with pytest.raises(TransportAddressError, match="vsock"):
            open_blocking_transport(bad, TransportOptions())


class TestBlockingTlsConformance(_Loopback):
    @pytest.fixture(autouse=True)
    def _certs(self) -> None:
        ca = trustme.CA()
        server_cert = ca.issue_cert("localhost", "127.0.0.1")
        client_cert = ca.issue_cert("guest0")
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(server_ctx)
        ca.configure_trust(server_ctx)
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(client_ctx)
        client_cert.configure_cert(client_ctx)
        self.server_opts = TransportOptions(ssl_context=server_ctx)
        self.client_opts = TransportOptions(ssl_context=client_ctx, server_hostname="127.0.0.1")

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return trio_peer_pair(
            "tls://127.0.0.1:0",
            max_frame_size,
            server_options=self.server_opts,
            client_options=self.client_opts,
        )


# --------------------------------------------------------------------------- the kit itself


@contextmanager
def _unix_pair_of(
    cls: type[BlockingStreamTransport], path: Path, max_frame_size: int
) -> Iterator[tuple[BlockingStreamTransport, TrioPeer]]:
    """A client of class ``cls`` (a broken transport, say) against a trio ``unix:`` peer."""
    with TrioPeer(f"unix:{path}", TransportOptions(max_frame_size=max_frame_size)) as peer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        client = cls(sock, max_frame_size, name=f"unix:{path}")
        try:
            peer.accept()
            yield client, peer
        finally:
            client.close()


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


def _suite(tmp_path: Path, cls: type[BlockingStreamTransport]) -> BlockingTransportConformance:
    suite = BlockingTransportConformance()
    suite.timeout = 2.0
    names = iter(range(1000))
    suite.make_pair = lambda size: _unix_pair_of(  # type: ignore[method-assign]
        cls, tmp_path / f"{next(names)}.sock", size
    )
    return suite


def test_the_kit_catches_a_transport_without_busy_detection(tmp_path: Path) -> None:
    with pytest.raises(BlockingConformanceFailure, match="second thread receiving"):
        _suite(tmp_path, _Unguarded).test_two_receivers_at_once_is_busy()


def test_the_kit_catches_a_transport_that_changes_frames(tmp_path: Path) -> None:
    with pytest.raises(BlockingConformanceFailure, match="reached the peer changed"):
        _suite(tmp_path, _Truncating).test_frames_both_ways_in_order()


def test_the_kit_runs_without_pytest(tmp_path: Path) -> None:
    names = iter(range(1000))
    passed = run_blocking_conformance(
        lambda size: trio_peer_pair(f"unix:{tmp_path / f'{next(names)}.sock'}", size)
    )
    assert passed == CHECKS
