"""Issue 8, stalls: nothing a guest controls may block the backend's event loop.

Each test is the reproduction from the issue. On the code before the fix the
event loop blocked (for good, or until the test's watchdog let it go), so the
honest guest's latency, measured on the wall clock, is what fails.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from _limits_support import EDU, IRQ_RAISE, TWO_GUESTS, bar_write, raw_guest, worst_latency

import pcifront
from pciback.testing import running_backend
from shared.evtchn import GUARD_SECONDS
from shared.evtchn._guard import ffi, lib
from shared.protocol import (
    IRQ_MODE_INTX,
    Connection,
    InterruptEnableRequest,
    Limits,
    PingRequest,
    Role,
    ValueReply,
    Welcome,
)
from shared.transport import TransportOptions, open_transport
from shared.transport._shm import ShmTransport

#: The attack plus 20 config reads by an honest guest take at most this long
#: (wall clock: the backend, both guests and trio's clock share one thread).
LATENCY_BOUND = 1.0
#: The eventfd counter's largest value: one more increment would block.
COUNTER_MAX = 0xFFFF_FFFF_FFFF_FFFE


@contextmanager
def unblock_after(seconds: float, fd: int) -> Iterator[None]:
    """A watchdog for the unfixed code: drain ``fd`` after ``seconds`` so a blocked
    event loop resumes and the test fails on latency instead of hanging."""
    timer = threading.Timer(seconds, lambda: os.eventfd_read(fd))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_guarded_write_is_cut_short_when_the_fd_blocks() -> None:
    # A pipe with 4 KiB free polls writable, yet an 8 KiB write blocks after 4 KiB:
    # the window a guest opens by filling its counter between our poll and our write.
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        while True:
            try:
                os.write(w, b"x" * 4096)
            except BlockingIOError:
                break
        os.read(r, 4096)
        os.set_blocking(w, True)
        buf = ffi.new("char[]", 8192)
        # Without the guard the write would block until the watchdog drains the pipe.
        drain = threading.Timer(3.0, lambda: os.read(r, 1 << 20))
        drain.start()
        try:
            start = time.monotonic()
            result = lib.pcisplit_guarded_write(w, buf, 8192, int(GUARD_SECONDS * 1e9))
            elapsed = time.monotonic() - start
        finally:
            drain.cancel()
        # Cut short: the 4 KiB that fitted (a partial write) or nothing at all.
        assert result in (4096, -errno.ETIMEDOUT)
        assert elapsed < 0.5  # the guard is 2 ms; generous for a loaded machine
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_interrupt_eventfd_made_blocking_and_full_stalls_nobody(
    kind: str, tmp_path: Path
) -> None:
    async with (
        running_backend(TWO_GUESTS, transports=(kind,), tmp=tmp_path) as rb,
        pcifront.connect(rb.address(kind), guest="victim") as victim,
        raw_guest(rb.address(kind), "mallory") as mallory,
    ):
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            reply = await mallory.request(
                lambda rid: InterruptEnableRequest(rid, EDU, IRQ_MODE_INTX, 1, True), [efd]
            )
            assert isinstance(reply, ValueReply)
            # The attack: O_NONBLOCK lives on the description the backend shares.
            os.set_blocking(efd, True)
            os.eventfd_write(efd, COUNTER_MAX)
            with unblock_after(3.0, efd):
                start = time.monotonic()
                await bar_write(mallory, IRQ_RAISE, 1)  # the backend delivers at once
                await worst_latency(victim)
                assert time.monotonic() - start < LATENCY_BOUND
            (session,) = [s for s in rb.backend.sessions if s.guest == "mallory"]
            stats = session.outbox.statistics()
            assert stats.counter_full == 1  # the delivery coalesced into the full counter
            assert stats.eventfd_signals == 0
        finally:
            os.close(efd)


async def test_shm_doorbell_made_blocking_and_full_stalls_nobody(tmp_path: Path) -> None:
    async with (
        running_backend(TWO_GUESTS, transports=("shm",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("shm"), guest="victim") as victim,
        await open_transport(rb.address("shm"), TransportOptions()) as transport,
    ):
        # Mallory handshakes by hand, so nothing on her side ever reads her doorbell.
        conn = Connection(Role.CLIENT, limits=Limits(), guest="mallory")
        await transport.send_frame(conn.hello())
        assert isinstance(conn.receive(await transport.receive_frame()), Welcome)
        size = conn.peer_limits.max_message_size
        transport.set_max_frame_size(size)
        await transport.start_session(is_server=False, max_frame_size=size)
        assert isinstance(transport, ShmTransport)
        session = transport._session  # the client's own end of the rings
        assert session is not None
        to_client = session.rx_port.fileno()  # the backend rings this one
        os.set_blocking(to_client, True)
        os.eventfd_write(to_client, COUNTER_MAX)
        # "I am going to sleep": the backend must ring the doorbell with its reply.
        while session.consumer.prepare_wait():
            pass
        with unblock_after(3.0, to_client):
            start = time.monotonic()
            await transport.send_frame(conn.send(PingRequest(conn.next_request_id())))
            await trio.testing.wait_all_tasks_blocked()  # the backend has answered her
            await worst_latency(victim)
            assert time.monotonic() - start < LATENCY_BOUND
        (backend_end,) = [s for s in rb.backend.sessions if s.guest == "mallory"]
        backend_transport = backend_end.transport
        assert isinstance(backend_transport, ShmTransport)
        assert backend_transport._session is not None
        # The doorbell write was skipped (the counter was full), not blocked on.
        assert backend_transport._session.tx_port.statistics().coalesced == 1
