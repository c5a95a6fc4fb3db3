"""Every built-in stream transport passes the conformance suite."""

from __future__ import annotations

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
from shared.transport._sockets import vsock_loopback_problem
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


_VSOCK_SKIP = vsock_loopback_problem()


@pytest.mark.skipif(_VSOCK_SKIP is not None, reason=str(_VSOCK_SKIP))
class TestVsockConformance(TransportConformance):
    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _listener_pair("vsock://1:0", max_frame_size)
