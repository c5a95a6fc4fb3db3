"""Fds a connection keeps after the hand-over count against ``limits.max_fds_per_connection``.

The transports bound fds in flight (``FdTracker``, ``PSHM-FDS``; see
``test_growth.py``); once a request takes them, the session keeps them: one
eventfd per interrupt vector bound to an eventfd, one memfd per shared DMA
window. The dispatcher counts those and refuses (``BUSY``, naming the limit and
what to do; the fds closed at once) a request whose fds would take the
connection over the limit. Over ``unix:`` and ``shm:``, the transports that
pass fds, with a guest that maps many windows and one that enables many MSI-X
vectors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import _backend_proc  # noqa: F401 - registers the sec-msix model (a 16-entry MSI-X table)
import pytest
from _limits_support import EDU, raw_guest

from pciback.ops.control_server import ControlApi
from pciback.testing import running_backend
from shared.errors import ErrorCode
from shared.protocol import (
    IRQ_MODE_INTX,
    IRQ_MODE_MSI,
    IRQ_MODE_MSIX,
    ConfigWriteRequest,
    DmaMapRequest,
    DmaUnmapRequest,
    ErrorReply,
    InterruptDisableRequest,
    InterruptEnableRequest,
    ValueReply,
)
from tests.support.configs import device_table, edu_config
from tests.support.rawguest import sealed_memfd

#: mallory's bus: edu at 00.0, the MSI-X device at 01.0.
MSIX = 0x0008
COMMAND, MEMORY_DECODE = 0x04, 0x2


def config(max_fds: int) -> str:
    return (
        f"[limits]\nmax_fds_per_connection = {max_fds}\n"
        + edu_config(["mallory"], {"edu-m": "mallory"})
        + device_table("msix-m", "mallory", model="sec-msix")
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def guest_fds() -> Iterator[list[int]]:
    """The guest's own copies of the fds it sends (closed when the test ends)."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def eventfds(n: int, keep: list[int]) -> list[int]:
    new = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
    keep.extend(new)
    return new


def memfd(keep: list[int]) -> list[int]:
    keep.append(sealed_memfd(4096))
    return [keep[-1]]


def refused_for_fds(reply: object, held: int) -> None:
    assert isinstance(reply, ErrorReply), reply
    assert reply.code is ErrorCode.BUSY
    assert "limits.max_fds_per_connection" in reply.message
    assert f"already holds {held}" in reply.message
    assert "unmap shared windows" in reply.message  # and what to do about it


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_interrupt_eventfds_and_shared_windows_count_against_the_limit(
    kind: str, tmp_path: Path, guest_fds: list[int]
) -> None:
    async with (
        running_backend(config(4), transports=(kind,), tmp=tmp_path) as rb,
        raw_guest(rb.address(kind), "mallory") as g,
    ):
        await g.ok(
            lambda rid: InterruptEnableRequest(rid, EDU, IRQ_MODE_MSI, 1, True),
            eventfds(1, guest_fds),
        )
        (session,) = rb.backend.sessions_of("mallory")  # served a request: it is there
        windows = []
        for _ in range(3):
            reply = await g.ok(lambda rid: DmaMapRequest(rid, 4096, True, True), memfd(guest_fds))
            assert isinstance(reply, ValueReply)
            windows.append(reply.value)
        assert session.held_fds() == 4

        # A fifth fd is refused, and the backend does not keep it.
        fd = memfd(guest_fds)
        before = open_fds()
        refused_for_fds(await g.request(lambda rid: DmaMapRequest(rid, 4096, True, True), fd), 4)
        assert open_fds() == before
        assert rb.backend.stats.limits_exceeded["max_fds_per_connection"] == 1
        assert session.held_fds() == 4
        # What holds no fd is not limited by it: a message-based window.
        assert isinstance(await g.ok(lambda rid: DmaMapRequest(rid, 4096)), ValueReply)

        # ctl status shows the count per connection.
        status = await ControlApi(rb.backend).handle({"command": "status"})
        (row,) = status["result"]["sessions"]
        assert (row["guest"], row["fds_held"]) == ("mallory", 4)
        assert "4/4 fds held" in status["text"]

        # Giving fds back makes room: unmap a shared window, disable the interrupt.
        await g.ok(lambda rid: DmaUnmapRequest(rid, windows.pop()))
        assert session.held_fds() == 3
        await g.ok(lambda rid: DmaMapRequest(rid, 4096, True, True), memfd(guest_fds))
        await g.ok(lambda rid: InterruptDisableRequest(rid, EDU, IRQ_MODE_MSI))
        assert session.held_fds() == 3
        await g.ok(
            lambda rid: InterruptEnableRequest(rid, EDU, IRQ_MODE_INTX, 1, True),
            eventfds(1, guest_fds),
        )
        assert session.held_fds() == 4
        refused_for_fds(
            await g.request(
                lambda rid: InterruptEnableRequest(rid, MSIX, IRQ_MODE_MSIX, 1, True),
                eventfds(1, guest_fds),
            ),
            4,
        )
        assert rb.backend.stats.limits_exceeded["max_fds_per_connection"] == 2
    assert rb.backend.stats.requests_refused["BUSY"] == 2


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_many_msix_vectors_and_windows_stay_within_the_limit(
    kind: str, tmp_path: Path, guest_fds: list[int]
) -> None:
    async with (
        running_backend(config(8), transports=(kind,), tmp=tmp_path) as rb,
        raw_guest(rb.address(kind), "mallory") as g,
    ):
        await g.ok(lambda rid: ConfigWriteRequest(rid, MSIX, COMMAND, 2, MEMORY_DECODE))
        (session,) = rb.backend.sessions_of("mallory")  # served a request: it is there
        await g.ok(lambda rid: DmaMapRequest(rid, 4096, True, True), memfd(guest_fds))
        await g.ok(lambda rid: DmaMapRequest(rid, 4096, True, True), memfd(guest_fds))
        # 2 memfds held: 8 vectors through eventfds would make 10.
        fds = eventfds(8, guest_fds)
        before = open_fds()
        reply = await g.request(
            lambda rid: InterruptEnableRequest(rid, MSIX, IRQ_MODE_MSIX, 8, True), fds
        )
        refused_for_fds(reply, 2)
        assert open_fds() == before  # all 8 closed by the backend
        reply = await g.ok(
            lambda rid: InterruptEnableRequest(rid, MSIX, IRQ_MODE_MSIX, 6, True),
            eventfds(6, guest_fds),
        )
        assert isinstance(reply, ValueReply) and reply.value == 6
        assert session.held_fds() == 8
        refused_for_fds(
            await g.request(lambda rid: DmaMapRequest(rid, 4096, True, True), memfd(guest_fds)), 8
        )
        # In-band interrupts need no fds: the same device's other mode-free work goes on.
        await g.ok(lambda rid: InterruptDisableRequest(rid, MSIX, IRQ_MODE_MSIX))
        assert session.held_fds() == 2
        reply = await g.ok(lambda rid: InterruptEnableRequest(rid, MSIX, IRQ_MODE_MSIX, 16, False))
        assert isinstance(reply, ValueReply) and reply.value == 16
        assert session.held_fds() == 2
    assert rb.backend.stats.limits_exceeded["max_fds_per_connection"] == 2
