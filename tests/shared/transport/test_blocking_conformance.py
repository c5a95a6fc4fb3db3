"""Every blocking transport passes the blocking conformance suite, against the trio peer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from shared.transport import (
    BlockingTransport,
    FrameTransport,
    TransportOptions,
    open_blocking_transport,
    open_listener,
)
from shared.transport.blocking_conformance import BlockingTransportConformance
from tests.support.tls import transport_options


@asynccontextmanager
async def _blocking_pair(
    address: str,
    max_frame_size: int,
    server_opts: TransportOptions | None = None,
    client_opts: TransportOptions | None = None,
    *,
    session: bool = False,
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
            client = await trio.to_thread.run_sync(
                open_blocking_transport, listener.address, client_opts
            )
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


class TestBlockingUnixConformance(BlockingTransportConformance):
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.path = tmp_path / "t.sock"

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair(f"unix:{self.path}", max_frame_size)


class TestBlockingShmConformance(BlockingTransportConformance):
    poll_us: float | None = None

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.path = tmp_path / "s.sock"

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair(
            f"shm:{self.path}", max_frame_size, client_opts=TransportOptions(poll_us=self.poll_us),
            session=True,
        )


class TestBlockingShmPollingConformance(TestBlockingShmConformance):
    """The same contract with the receiver spinning on the ring first."""

    poll_us = 50.0


class TestBlockingTcpConformance(BlockingTransportConformance):
    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair("tcp://127.0.0.1:0", max_frame_size)


class TestBlockingTlsConformance(BlockingTransportConformance):
    @pytest.fixture(autouse=True)
    def _certs(self) -> None:
        self.server_opts, self.client_opts = transport_options()

    def make_pair(self, max_frame_size: int):  # type: ignore[no-untyped-def]
        return _blocking_pair(
            "tls://127.0.0.1:0", max_frame_size, self.server_opts, self.client_opts
        )
