"""Every built-in stream transport passes the conformance suite."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from shared.transport import (
    FrameTransport,
    TransportOptions,
    memory_transport_pair,
    open_listener,
    open_transport,
)
from shared.transport.conformance import TransportConformance
from tests.support.tls import transport_options


@asynccontextmanager
async def _listener_pair(
    address: str,
    max_frame_size: int,
    server_opts: TransportOptions | None = None,
    client_opts: TransportOptions | None = None,
) -> AsyncIterator[tuple[FrameTransport, FrameTransport]]:
    server_opts = server_opts or TransportOptions()
    client_opts = client_opts or TransportOptions()
    server_opts.max_frame_size = client_opts.max_frame_size = max_frame_size
    listener = await open_listener(address, server_opts)
    try:
        async with trio.open_nursery() as nursery:
            accepted: list[FrameTransport] = []

            async def accept_one() -> None:
                server = await listener.accept()
                await server.do_handshake()  # TLS: the client's connect waits for it
                accepted.append(server)

            nursery.start_soon(accept_one)
            client = await open_transport(listener.address, client_opts)
        server = accepted[0]
        try:
            yield client, server
        finally:
            await client.aclose()
            await server.aclose()
    finally:
        await listener.aclose()


class TestMemoryConformance(TransportConformance):
    backpressure_frames = 64

    @asynccontextmanager
    async def make_pair(
        self, max_frame_size: int
    ) -> AsyncIterator[tuple[FrameTransport, FrameTransport]]:
        a, b = memory_transport_pair(max_frame_size=max_frame_size)
        try:
            yield a, b
        finally:
            await a.aclose()
            await b.aclose()


class TestMemoryListenerConformance(TransportConformance):
    backpressure_frames = 64

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _listener_pair("memory:conformance", max_frame_size)


class TestUnixConformance(TransportConformance):
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.path = tmp_path / "t.sock"

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _listener_pair(f"unix:{self.path}", max_frame_size)


class TestTcpConformance(TransportConformance):
    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _listener_pair("tcp://127.0.0.1:0", max_frame_size)


class TestTlsConformance(TransportConformance):
    @pytest.fixture(autouse=True)
    def _certs(self) -> None:
        self.server_opts, self.client_opts = transport_options()

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _listener_pair(
            "tls://127.0.0.1:0", max_frame_size, self.server_opts, self.client_opts
        )


def _vsock_loopback_works() -> str | None:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return "this Python has no AF_VSOCK"
    try:
        srv = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot create an AF_VSOCK socket: {exc}"
    try:
        srv.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        srv.listen(1)
        port = srv.getsockname()[1]
        cli = socket.socket(family, socket.SOCK_STREAM)
        cli.settimeout(2)
        try:
            cli.connect((1, port))  # CID 1: local loopback
        finally:
            cli.close()
    except OSError as exc:
        return f"vsock loopback (CID 1) does not answer on this machine: {exc}"
    finally:
        srv.close()
    return None


_VSOCK_SKIP = _vsock_loopback_works()


@pytest.mark.skipif(_VSOCK_SKIP is not None, reason=str(_VSOCK_SKIP))
class TestVsockConformance(TransportConformance):
    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _listener_pair("vsock://1:0", max_frame_size)
