"""DMA outside its windows, hostile DMA call results, and window-table abuse.

guest1 programs its edu1 to DMA where it has no window, across a window's
end, and answers the backend's DMA calls with lies. Each DMA outside a
window is a ``DmaFaultEvent`` to the guest; nothing reaches another guest's
memory and the backend goes on.
"""

from __future__ import annotations

import fcntl
import os

import pytest
import trio
from _hostile import (
    BAR_WRITE,
    CFG_WRITE,
    DMA_MAP,
    DMA_RESULT,
    DMA_UNMAP,
    PING,
    Peer,
    find_devices,
    is_error,
    ok,
    pack,
    peer,
)
from conftest import sentinel

from shared.protocol import DmaFaultEvent, DmaReadCall, ValueReply

EDU = 0x11E8
COMMAND, MEMORY_AND_MASTER = 0x04, 0x6
SRC, DST, COUNT, CMD = 0x80, 0x88, 0x90, 0x98
START = 0x01  # RAM -> edu buffer: the device reads guest memory
EDU_BUFFER = 0x40000



class Rid:
    def __init__(self) -> None:
        self.n = 200

    def __call__(self) -> int:
        self.n += 1
        return self.n


async def _edu_ready(p: Peer, rid: Rid) -> int:
    edu = (await find_devices(p))[EDU]
    ok(await p.request(pack(CFG_WRITE, rid(), edu, COMMAND, 2, MEMORY_AND_MASTER)))
    return edu


async def _start_dma(p: Peer, rid: Rid, edu: int, src: int, count: int) -> None:
    for reg, value in ((SRC, src), (DST, EDU_BUFFER), (COUNT, count)):
        ok(await p.request(pack(BAR_WRITE, rid(), edu, 0, reg, 8, value)))
    await p.send(pack(BAR_WRITE, rid(), edu, 0, CMD, 8, START))


async def _next(p: Peer, kind: type, timeout: float = 10.0):
    with trio.fail_after(timeout):
        while True:
            msg = await p.receive(timeout)
            if isinstance(msg, kind):
                return msg


async def _windows_released(backend, guest: str = "guest1") -> int:
    """The guest's window count once its session's teardown ran (it runs after the
    disconnect, asynchronously in the backend process); polled for at most 5 s."""
    with trio.move_on_after(5):
        while backend.stats()["dma"][guest]["windows"] != 0:
            await trio.sleep(0.02)
    return int(backend.stats()["dma"][guest]["windows"])


async def _map(p: Peer, rid: Rid, size: int) -> int:
    reply = ok(await p.request(pack(DMA_MAP, rid(), size, True, False)))
    assert isinstance(reply, ValueReply), reply
    return reply.value


@pytest.mark.parametrize("where", ["unmapped", "across-the-end"])
async def test_device_dma_outside_the_windows_faults(backend, kind, where):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            rid = Rid()
            edu = await _edu_ready(p, rid)
            window = await _map(p, rid, 4096)
            src, count = {
                "unmapped": (window + 0x100000, 64),
                "across-the-end": (window + 4096 - 16, 64),
            }[where]
            await _start_dma(p, rid, edu, src, count)
            fault = await _next(p, DmaFaultEvent)
            assert fault.device == edu
    assert await _windows_released(backend) == 0


@pytest.mark.parametrize("lie", ["short-data", "long-data", "unknown-call", "twice", "error-code"])
async def test_hostile_dma_call_results(backend, kind, lie):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            rid = Rid()
            edu = await _edu_ready(p, rid)
            window = await _map(p, rid, 4096)
            await _start_dma(p, rid, edu, window, 64)
            call = await _next(p, DmaReadCall)
            answers = {
                "short-data": [pack(DMA_RESULT, call.call_id, 0, b"x" * (call.length - 1))],
                "long-data": [pack(DMA_RESULT, call.call_id, 0, b"x" * (call.length + 4096))],
                "unknown-call": [pack(DMA_RESULT, call.call_id + 1000, 0, b"")],
                "twice": [pack(DMA_RESULT, call.call_id, 0, b"x" * call.length)] * 2,
                "error-code": [pack(DMA_RESULT, call.call_id, 9999, b"")],
            }[lie]
            for answer in answers:
                await p.send(answer)
            await p.send(pack(PING, rid()))
            with trio.move_on_after(3):
                await p.until_closed()


async def test_window_table_abuse(backend, kind):
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            rid = Rid()
            for size in (0, (1 << 30) + 1, 2**64 - 1, -1):
                reply = await p.request(pack(DMA_MAP, rid(), size, True, False))
                assert is_error(reply) or reply.__class__.__name__ == "Goodbye", (size, reply)
                if not is_error(reply):
                    return
            windows = [await _map(p, rid, 1 << 20) for _ in range(200)]
            assert len(set(windows)) == 200
            for address in (0, 1, windows[0] + 4096, 2**64 - 1):
                assert is_error(await p.request(pack(DMA_UNMAP, rid(), address))), address
            ok(await p.request(pack(DMA_UNMAP, rid(), windows[0])))
            assert is_error(await p.request(pack(DMA_UNMAP, rid(), windows[0])))
            assert backend.stats()["dma"]["guest1"]["windows"] == 199
    # Leaving without unmapping: the session's teardown removes them all.
    assert await _windows_released(backend) == 0


@pytest.fixture(params=["unix", "shm"])
def fd_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_shared_windows_with_bad_memfds(backend, fd_kind):
    """Pipes, unsealed memfds, memfds smaller than the window: refused and not kept."""
    async with sentinel(backend, fd_kind):
        async with peer(backend.address(fd_kind), handshake=True) as p:
            rid = Rid()
            r, w = os.pipe()
            unsealed = os.memfd_create("sec-unsealed", os.MFD_CLOEXEC)
            os.ftruncate(unsealed, 8192)
            small = os.memfd_create("sec-small", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(small, 4096)
            fcntl.fcntl(small, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            try:
                for fds, size in (([r], 4096), ([unsealed], 4096), ([small], 8192),
                                  ([small, small], 4096), ([], 4096)):
                    frame = pack(DMA_MAP, rid(), size, True, True)
                    if fds:
                        await p.transport.send_frame_with_fds(frame, fds)
                    else:
                        await p.send(frame)
                    assert is_error(await p.receive()), (fds, size)
            finally:
                for fd in (r, w, unsealed, small):
                    os.close(fd)


async def test_unmap_answered_after_the_connection_failed(backend):
    """Issue 8 crash 4: the unmap answered from a task after its connection failed.

    unix: only: there both frames arrive in one read. trio randomises the order of tasks
    woken together, so the race is tried several times (it crashed the backend in most).
    """
    async with sentinel(backend, "unix"):
        for _ in range(CRASH4_ROUNDS):
            async with peer(backend.address("unix"), handshake=True) as p:
                rid = Rid()
                edu = await _edu_ready(p, rid)
                window = await _map(p, rid, 4096)
                await _start_dma(p, rid, edu, window, 64)
                call = await _next(p, DmaReadCall)  # in flight until we answer it
                await p.send(pack(DMA_UNMAP, rid(), window))  # answered once that DMA is done
                # The answer completes the DMA, and the fatal frame right behind it (same
                # write) fails the connection before the unmap task gets to send its reply.
                await p.send_many(
                    [pack(DMA_RESULT, call.call_id, 0, b"x" * call.length), pack(PING, -1)]
                )
                await p.until_closed()


CRASH4_ROUNDS = 8
