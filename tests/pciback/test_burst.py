"""The backend answers a burst of pipelined requests in one go (issue 11, section 1).

A guest that pipelines sends many requests at once; the backend reads every one
that already arrived, answers them all and sends the replies as one batch (one
write, or one doorbell on ``shm:``), without a pass through the scheduler per
request. A trio instrument counts the backend session's task steps while one
burst is served.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from pciback.testing import running_backend
from shared.protocol import (
    ConfigReadRequest,
    Connection,
    Limits,
    PingRequest,
    Role,
    ValueReply,
)
from shared.transport import TransportOptions, open_transport
from tests.support.configs import ONE_GUEST

BURST = 32


class _BackendSteps(trio.abc.Instrument):
    """Task steps of tasks whose coroutine lives in the backend's package."""

    def __init__(self) -> None:
        self.steps = 0
        self.names: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        code = getattr(task.coro, "cr_code", None)
        if code is not None and "/pciback/" in code.co_filename:
            self.steps += 1
            self.names.append(task.name)


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_a_burst_is_answered_without_a_step_per_request(tmp_path: Path, kind: str) -> None:
    async with running_backend(ONE_GUEST, transports=(kind,), tmp=tmp_path) as rb:
        transport = await open_transport(rb.address(kind), TransportOptions())
        async with transport:
            conn = Connection(Role.CLIENT, limits=Limits(), guest="guest0")
            await transport.send_frame(conn.hello(b""))
            conn.receive(await transport.receive_frame())
            transport.set_max_frame_size(conn.frame_size)
            await transport.start_session(is_server=False, max_frame_size=conn.frame_size)
            # One round trip first: the session's helper tasks take their first steps.
            await transport.send_frame(conn.send(PingRequest(conn.next_request_id())))
            conn.receive(await transport.receive_frame())
            await trio.testing.wait_all_tasks_blocked()
            frames = []
            for _ in range(BURST):
                rid = conn.next_request_id()
                frames.append(conn.send(ConfigReadRequest(rid, 0, 0, 4)))
            steps = _BackendSteps()
            trio.lowlevel.add_instrument(steps)
            try:
                await transport.send_frames(frames)  # one write / one doorbell
                replies = [conn.receive(await transport.receive_frame()) for _ in range(BURST)]
            finally:
                trio.lowlevel.remove_instrument(steps)
    assert all(isinstance(r, ValueReply) and r.value == 0x11E81234 for r in replies)
    assert sorted(r.request_id for r in replies) == list(range(2, BURST + 2))
    # One step reads and answers the whole burst; its batched send may add one more.
    # A step per request would be 32.
    assert steps.steps <= 3, steps.names
