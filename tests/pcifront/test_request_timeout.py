"""A request the backend never answers fails with TIMED_OUT after ``timeout``.

The only caller is the one reading the transport for itself (it reads its own
reply, see ``pcifront.client.pump``), so the watchdog has to stop that read: over
``shm:`` through ``FrameTransport.interrupt_receive`` (no cancel scope per
read), over ``unix:`` through the caller's cancel scope. The backend here is a
stub that completes the handshake, answers the bus snapshot and then stays
silent, with its connection open.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import pcifront
from shared.errors import ErrorCode
from shared.protocol import Connection, Limits, Role, SnapshotReply, SnapshotRequest
from shared.transport import FrameTransport, TransportOptions, open_listener


async def _silent_backend(transport: FrameTransport, answered: trio.Event) -> None:
    conn = Connection(Role.SERVER, limits=Limits())
    async with transport:
        conn.receive(await transport.receive_frame())  # the Hello
        await transport.send_frame(conn.accept())
        transport.set_max_frame_size(conn.frame_size)
        await transport.start_session(is_server=True, max_frame_size=conn.frame_size)
        while True:
            try:
                frame = await transport.receive_frame()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                return  # the frontend closed the connection at the end of the test
            msg = conn.receive(frame)
            if isinstance(msg, SnapshotRequest):
                await transport.send_frame(conn.send_reply(SnapshotReply(msg.request_id)))
            else:
                answered.set()  # a request we will never answer arrived


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_an_unanswered_request_times_out_and_the_bus_stays_usable(
    tmp_path: Path, kind: str
) -> None:
    listener = await open_listener(f"{kind}:{tmp_path / 'silent.sock'}", TransportOptions())
    arrived = trio.Event()
    async with listener, trio.open_nursery() as nursery:

        async def serve() -> None:
            while True:
                nursery.start_soon(_silent_backend, await listener.accept(), arrived)

        nursery.start_soon(serve)
        async with pcifront.connect(listener.address, guest="guest0", timeout=0.5) as bus:
            with trio.fail_after(10):  # the time-out must fire, not this
                with pytest.raises(pcifront.RequestError) as err:
                    await bus.ping()
            assert err.value.code is ErrorCode.TIMED_OUT
            assert "within 0.5 s" in str(err.value)
            assert arrived.is_set()
            # The reader was stopped, not broken: a second caller can read again.
            with trio.fail_after(10), pytest.raises(pcifront.RequestError):
                await bus.ping()
        nursery.cancel_scope.cancel()
