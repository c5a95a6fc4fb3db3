"""Guest-triggered log lines in a running backend: counted in `ctl status`, summarised at close."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from pciback._ratelog import GUEST_LOG_BURST, SUMMARY_INTERVAL
from pciback.ops.control_server import ControlApi
from pciback.service import LOG_TICK
from pciback.testing import running_backend
from shared.errors import ErrorCode
from shared.protocol import (
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    DmaMapRequest,
    ErrorReply,
)
from tests.support.configs import edu_config
from tests.support.rawguest import EDU, raw_guest

CONFIG = "[limits]\nmax_dma_windows_per_guest = 1\n" + edu_config(["mallory"], {"edu-m": "mallory"})

#: A packed address with no device on mallory's bus.
NOWHERE = 0x0010


async def test_refusals_are_counted_rate_limited_and_shown_by_ctl_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pcisplit.backend")
    async with running_backend(CONFIG, transports=("unix",), tmp=tmp_path) as rb:
        async with raw_guest(rb.address("unix"), "mallory") as g:
            for _ in range(30):
                reply = await g.request(lambda rid: ConfigReadRequest(rid, NOWHERE, 0, 4))
                assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NOT_FOUND
            await g.ok(lambda rid: DmaMapRequest(rid, 4096))
            over = await g.request(lambda rid: DmaMapRequest(rid, 4096))
            assert isinstance(over, ErrorReply) and over.code is ErrorCode.BUSY
            lines = [r for r in caplog.records if "refused (NOT_FOUND)" in r.getMessage()]
            assert len(lines) == 10  # the burst; the other 20 are counted
            answer = await ControlApi(rb.backend).handle({"command": "status"})
    # The connection closed: its suppressed run was summarised once.
    (summary,) = [r.getMessage() for r in caplog.records if "more refused" in r.getMessage()]
    assert summary.startswith(
        "guest mallory (connection 1): 20 more refused ConfigReadRequests suppressed in the last "
    )
    assert answer["ok"], answer
    json.dumps(answer)  # the control socket sends it as JSON: Counters must be plain dicts
    counters = answer["result"]["counters"]
    assert counters["requests_refused"] == {"NOT_FOUND": 30, "BUSY": 1}
    assert counters["limits_exceeded"] == {"max_dma_windows_per_guest": 1}
    assert counters["log_lines"]["suppressed"] == {"refused ConfigReadRequests": 20}
    assert counters["log_lines"]["logged"]["refused ConfigReadRequests"] == 10
    assert counters["log_lines_suppressed"] == 20
    assert "log_lines_suppressed 20" in answer["text"]


async def test_a_device_model_dma_fault_loop_is_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """edu DMA aimed at nothing, 30 times: 30 fault events for the guest, at most a burst of
    log lines (device models log through pciback._ratelog.MODEL_LOG)."""
    caplog.set_level(logging.INFO, logger="pcisplit.devices")
    async with running_backend(CONFIG, transports=("unix",), tmp=tmp_path) as rb:
        before = rb.backend.log_statistics().events("DMA faults")
        async with raw_guest(rb.address("unix"), "mallory") as g:
            await g.ok(lambda rid: ConfigWriteRequest(rid, EDU, 0x04, 2, 0x6))  # memory, master
            for i in range(30):
                for reg, value in ((0x80, 0x100000), (0x88, 0x40000), (0x90, 4), (0x98, 1)):
                    await g.ok(lambda rid, r=reg, v=value: BarWriteRequest(rid, EDU, 0, r, 8, v))
                await g.wait_faults(i + 1)
        assert rb.backend.log_statistics().events("DMA faults") - before == 30
    # MODEL_LOG is one per process: earlier tests may have spent some of the burst already.
    lines = [r for r in caplog.records if "edu DMA fault" in r.getMessage()]
    assert len(lines) <= GUEST_LOG_BURST


async def test_the_backend_summarises_a_flood_that_stopped_while_the_guest_stays(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pcisplit.backend")
    async with (
        running_backend(CONFIG) as rb,
        raw_guest(rb.address("memory"), "mallory") as g,
    ):
        for _ in range(25):
            await g.request(lambda rid: ConfigReadRequest(rid, NOWHERE, 0, 4))

        def summaries() -> list[str]:
            return [r.getMessage() for r in caplog.records if "more refused" in r.getMessage()]

        assert summaries() == []
        await trio.sleep(SUMMARY_INTERVAL - 1)
        assert summaries() == []  # not due yet
        await trio.sleep(1 + 2 * LOG_TICK)  # the backend's next tick finds it due
        (summary,) = summaries()
        head = "guest mallory (connection 1): 15 more refused ConfigReadRequests suppressed "
        assert summary.startswith(head + "in the last ") and summary.endswith(" s")
        seconds = float(summary.removeprefix(head + "in the last ").removesuffix(" s"))
        assert SUMMARY_INTERVAL <= seconds <= SUMMARY_INTERVAL + LOG_TICK
        await g.ok(lambda rid: ConfigReadRequest(rid, EDU, 0, 4))  # still connected


async def test_a_guest_reconnecting_in_a_loop_cannot_grow_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pcisplit.backend")
    cycles = 60
    async with running_backend(CONFIG, transports=("unix",), tmp=tmp_path) as rb:
        for _ in range(cycles):
            async with raw_guest(rb.address("unix"), "mallory"):
                pass  # handshake, then goodbye
        for _ in range(cycles):
            stream = await trio.open_unix_socket(rb.address("unix").partition(":")[2])
            await stream.aclose()  # connects and leaves before any handshake
        await trio.testing.wait_all_tasks_blocked()
        stats = rb.backend.guest_log.statistics()
    messages = [r.getMessage() for r in caplog.records]
    connected = [m for m in messages if "guest mallory connected" in m]
    gone = [m for m in messages if "peer went away" in m or "before the handshake" in m]
    # Each source and guest gets its burst; the rest are counted, none is dropped silently.
    assert len(connected) <= GUEST_LOG_BURST + 1
    assert len(gone) <= 2 * GUEST_LOG_BURST + 2
    assert stats.logged["connections"] + stats.suppressed["connections"] >= 3 * cycles
    assert stats.suppressed["connections"] >= 3 * cycles - 4 * GUEST_LOG_BURST - 4
