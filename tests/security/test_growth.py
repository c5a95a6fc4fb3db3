"""Issue 8, growth: one guest cannot take what is shared (fds, buffers, connections, DMA).

Each test drives the real backend in-process over real sockets and checks the
offender is disconnected or refused with a clear error, the event is counted in
``BackendStatistics.limits_exceeded``, what it held is given back, and an honest
guest connected throughout never notices.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import trio
from _limits_support import TWO_GUESTS, raw_guest, worst_latency

import pcifront
from pciback.service import Backend
from pciback.testing import TEST_TOKEN, running_backend
from shared.transport import FrameTransport
from shared.transport._shm import ShmTransport

#: The honest guest's config reads during and after an attack must come this quickly.
LATENCY_BOUND = 1.0
#: How long a test waits for the backend to drop an offender (limits are far shorter).
DROP_WITHIN = 10.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def limits(**values: object) -> str:
    body = "\n".join(f"{key} = {value!r}" for key, value in values.items())
    return f"[limits]\n{body}\n{TWO_GUESTS}"


async def wait_dropped(transport: FrameTransport) -> None:
    """Wait until the backend closes ``transport`` (EOF or a broken connection)."""
    with trio.fail_after(DROP_WITHIN):
        try:
            while True:
                await transport.receive_frame()
        except (trio.EndOfChannel, trio.BrokenResourceError):
            return


async def wait_counted(backend: Backend, limit: str, n: int = 1) -> None:
    with trio.fail_after(DROP_WITHIN):
        while backend.stats.limits_exceeded[limit] < n:
            await trio.sleep(0.01)


def raw_unix_socket(address: str) -> socket.socket:
    path = address.split(":", 1)[1]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


# --------------------------------------------------------------------------- growth 9: fds


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_fds_on_a_half_sent_frame_are_capped(kind: str, tmp_path: Path) -> None:
    config = limits(max_fds_per_connection=16)
    async with (
        running_backend(config, transports=(kind,), tmp=tmp_path) as rb,
        pcifront.connect(rb.address(kind), guest="victim", token=TEST_TOKEN) as victim,
    ):
        before = open_fds()
        pipes = [os.pipe() for _ in range(10)]
        fds = [fd for pair in pipes for fd in pair]  # 20 fds, over the limit of 16
        sock = raw_unix_socket(rb.address(kind))
        try:
            # The first bytes of a 1000-byte frame, carrying the fds; the rest never comes.
            header = struct.pack("<I", 1000) + b"x"
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("20i", *fds))
            sock.sendmsg([header], [rights])
            await wait_counted(rb.backend, "max_fds_per_connection")
            assert await worst_latency(victim) < LATENCY_BOUND
        finally:
            sock.close()
            for fd in fds:
                os.close(fd)
        with trio.fail_after(DROP_WITHIN):
            while open_fds() > before:  # the backend closed every fd it received
                await trio.sleep(0.01)


async def test_shm_fd_announcements_are_capped(tmp_path: Path) -> None:
    config = limits(max_fds_per_connection=16)
    async with (
        running_backend(config, transports=("shm",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("shm"), guest="victim", token=TEST_TOKEN) as victim,
        raw_guest(rb.address("shm"), "mallory") as mallory,
    ):
        transport = mallory.transport
        assert isinstance(transport, ShmTransport)
        before = open_fds()
        fds = [os.eventfd(0) for _ in range(10)]
        try:
            # Announce fds for ring frames far ahead that never come: 10 + 10 > 16.
            for seq in (100, 101):
                mark = b"PSHM-FDS" + struct.pack("<Q", seq)
                await transport.control.send_frame_with_fds(mark, fds)
            await wait_counted(rb.backend, "max_fds_per_connection")
            assert await worst_latency(victim) < LATENCY_BOUND
        finally:
            for fd in fds:
                os.close(fd)
        with trio.fail_after(DROP_WITHIN):
            while open_fds() > before:
                await trio.sleep(0.01)


# --------------------------------------------------------------------------- growth 10: buffers


@pytest.mark.parametrize("kind", ["unix", "tcp", "shm"])
async def test_partial_frame_idle_time_out(kind: str, tmp_path: Path) -> None:
    config = limits(partial_frame_timeout=0.2)
    async with (
        running_backend(config, transports=(kind,), tmp=tmp_path) as rb,
        pcifront.connect(rb.address(kind), guest="victim", token=TEST_TOKEN) as victim,
        raw_guest(rb.address(kind), "mallory") as mallory,
    ):
        transport = mallory.transport
        if isinstance(transport, ShmTransport):
            # Frames travel on the ring now; the control socket keeps unix:'s limits.
            assert transport.session_started
            transport = transport.control
        stream = transport.stream  # type: ignore[attr-defined]
        await stream.send_all(struct.pack("<I", 1000) + b"half a frame")
        await wait_counted(rb.backend, "partial_frame_timeout")
        assert [s.guest for s in rb.backend.sessions] == ["victim"]
        assert await worst_latency(victim) < LATENCY_BOUND


async def test_partial_frames_share_a_bounded_total(tmp_path: Path) -> None:
    # Each connection may hold 64 KiB for free; beyond that 200 KiB are shared by all.
    config = (
        "[limits]\nmax_message_size = 1048576\nmax_buffered_per_connection = 2097152\n"
        f"max_buffered_total = 204800\n{TWO_GUESTS}"
    )
    async with (
        running_backend(config, transports=("unix",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("unix"), guest="victim", token=TEST_TOKEN) as victim,
    ):
        budget = rb.backend.receive_budget
        hogs: list[trio.SocketStream] = []
        try:
            for _ in range(3):  # 3 x (150 KiB - 64 KiB) > 200 KiB: the third is dropped
                async with raw_guest(rb.address("unix"), "mallory") as mallory:
                    stream = mallory.transport.stream  # type: ignore[attr-defined]
                    hogs.append(trio.SocketStream(stream.socket.dup()))
            for hog_stream in hogs:
                with trio.move_on_after(DROP_WITHIN):
                    await hog_stream.send_all(struct.pack("<I", 1 << 20) + b"x" * (150 * 1024))
            await wait_counted(rb.backend, "max_buffered_total")
            assert budget.statistics().used <= 204800
            assert await worst_latency(victim) < LATENCY_BOUND
        finally:
            for hog_stream in hogs:
                await trio.aclose_forcefully(hog_stream)
        with trio.fail_after(DROP_WITHIN):
            while budget.statistics().used:
                await trio.sleep(0.01)
