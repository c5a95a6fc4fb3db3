"""The control socket is contained like a guest connection: a client ends only itself.

Each test runs an in-process backend with its control socket, keeps guest
``alpha`` connected (a real ``pcifront`` bus) and a guest ``beta`` that
negotiated hot-plug but never acknowledges, then does something a control
client can do wrong: leave before its answer, send half a line, a huge line,
invalid UTF-8, deeply nested JSON, never read its answers, stay silent, be
cancelled in the middle of an unassign, or come with many others at once.
Afterwards (:func:`operated` checks it on the way out) the backend still
serves: ``alpha`` reads its device correctly, a new control client gets its
``status``, and the failure was logged once and counted in ``ctl status``.

Before the control socket had its net, the first, the deep-nesting and the
unassign cases ended the whole backend (the exception escaped
``Backend.serve``), and the others were neither logged nor counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import pcifront
from pciback.config import parse_config
from pciback.ops.control_server import (
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_REQUEST,
    SEND_TIMEOUT,
    ControlApi,
)
from pciback.service import Backend
from pciback.testing import listen_address
from shared.protocol import HOTPLUG_FEATURE, Connection, Limits, Role, Welcome
from shared.transport import TransportOptions, open_transport

EDU_ID = 0x11E81234

CONFIG = """
[[guest]]
name = "alpha"
[[guest]]
name = "beta"
[[device]]
id = "edu-a"
model = "edu"
guest = "alpha"
[[device]]
id = "edu-b"
model = "edu"
guest = "beta"
"""


class LogWatch(logging.Handler):
    """The backend's log lines, and a way to wait for one (emitted in trio's thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    def lines(self, text: str) -> list[logging.LogRecord]:
        return [r for r in self.records if text in r.getMessage()]

    async def wait_for(self, text: str, count: int = 1) -> None:
        with trio.fail_after(60):  # a bound on a bug, not a synchronisation
            while len(self.lines(text)) < count:
                await self._changed.wait()


@dataclass
class Operated:
    backend: Backend
    control: Path
    bus: pcifront.Bus
    log: LogWatch

    @property
    def stats(self) -> Any:
        return self.backend.control_log.statistics()


async def request(path: Path, message: dict[str, Any]) -> Any:
    """One well-behaved control request over a new connection."""
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(json.dumps(message).encode() + b"\n")
        return json.loads(await read_line(stream))


async def read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        assert chunk, f"the control socket closed after {data!r}"
        data += chunk
    return data


async def never_acknowledging_guest(address: str, guest: str) -> None:
    """A guest that negotiates hot-plug, reads everything and acknowledges nothing."""
    transport = await open_transport(address, TransportOptions())
    async with transport:
        conn = Connection(Role.CLIENT, limits=Limits(), features=(HOTPLUG_FEATURE,), guest=guest)
        await transport.send_frame(conn.hello())
        assert isinstance(conn.receive(await transport.receive_frame()), Welcome)
        await transport.start_session(is_server=False, max_frame_size=transport.max_frame_size)
        try:
            while True:
                conn.receive(await transport.receive_frame())
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            return


@asynccontextmanager
async def operated(tmp: Path) -> AsyncIterator[Operated]:
    """A backend with its control socket, guests alpha and beta connected; checked at the end."""
    address = listen_address("memory", tmp)
    config = parse_config(f"listen = [{json.dumps(address)}]\n" + CONFIG, base=tmp)
    control = tmp / "pciback.ctl"
    backend = Backend(config, control=control)
    watch = LogWatch()
    logger = logging.getLogger("pcisplit.backend")
    logger.addHandler(watch)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            nursery.start_soon(never_acknowledging_guest, address, "beta")
            async with pcifront.connect(address, guest="alpha") as bus:
                await trio.testing.wait_all_tasks_blocked()
                assert len(backend.sessions_of("beta")) == 1
                yield Operated(backend, control, bus, watch)
                # The backend and a guest are alive: alpha reads its device, a new
                # control client gets its status, and no connection is left open.
                assert await bus.devices[0].config_read(0, 4) == EDU_ID
                status = await request(control, {"command": "status"})
                assert status["ok"], status
                assert status["result"]["guests"]["alpha"]["connections"] == 1
                await trio.testing.wait_all_tasks_blocked()
                assert (await request(control, {"command": "status"}))["result"]["control"][
                    "active"
                ] == 1  # only the one asking
            nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


async def control_counters(op: Operated) -> dict[str, Any]:
    answer = await request(op.control, {"command": "status"})
    assert answer["ok"], answer
    control: dict[str, Any] = answer["result"]["control"]
    assert "control socket:" in answer["text"]
    return control


# ----------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("command", ["list", "status"])
async def test_a_client_that_closes_without_reading_its_answer_ends_only_itself(
    tmp_path: Path, command: str
) -> None:
    async with operated(tmp_path) as op:
        async with await trio.open_unix_socket(str(op.control)) as stream:
            await stream.send_all(json.dumps({"command": command}).encode() + b"\n")
        await op.log.wait_for("the client left before its answer")
        (line,) = op.log.lines("the client left before its answer")
        assert line.levelno == logging.INFO and not line.exc_info
        counters = await control_counters(op)
        assert counters["ended"] == {"client went away": 1}
        assert op.stats.logged["client went away"] == 1


async def test_half_a_request_line_then_close(tmp_path: Path) -> None:
    async with operated(tmp_path) as op:
        async with await trio.open_unix_socket(str(op.control)) as stream:
            await stream.send_all(b'{"command": "sta')
        await op.log.wait_for("without its newline")
        assert (await control_counters(op))["ended"] == {"incomplete request": 1}


async def test_a_huge_line_is_answered_and_ends_the_connection(tmp_path: Path) -> None:
    async with operated(tmp_path) as op:
        async with await trio.open_unix_socket(str(op.control)) as stream:
            async with trio.open_nursery() as nursery:

                async def flood() -> None:
                    try:
                        await stream.send_all(b"x" * (64 * MAX_REQUEST))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the backend hung up on us, as it should

                nursery.start_soon(flood)
                answer = json.loads(await read_line(stream))
                assert answer["code"] == "PROTOCOL_ERROR" and str(MAX_REQUEST) in answer["error"]
                try:  # and closed (reset, if our flood was not all read)
                    assert await stream.receive_some(1) == b""
                except trio.BrokenResourceError:
                    pass
        await op.log.wait_for("longer than")
        assert (await control_counters(op))["ended"] == {"over-long request": 1}


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b'{"command": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b"[" * (MAX_REQUEST - 1), id="deep-list"),
        pytest.param(b'{"a":' * 800, id="deep-object"),
        pytest.param(b"\x00\x01\x02", id="binary"),
    ],
)
async def test_a_bad_line_gets_an_error_answer_and_the_connection_goes_on(
    tmp_path: Path, line: bytes
) -> None:
    async with operated(tmp_path) as op:
        async with await trio.open_unix_socket(str(op.control)) as stream:
            await stream.send_all(line + b"\n")
            answer = json.loads(await read_line(stream))
            assert answer["ok"] is False and answer["code"] == "PROTOCOL_ERROR"
            await stream.send_all(b'{"command": "status"}\n')
            assert json.loads(await read_line(stream))["ok"] is True
        assert (await control_counters(op))["ended"] == {}


async def test_a_reader_that_never_reads_its_answers_is_disconnected(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with operated(tmp_path) as op:
        async with await trio.open_unix_socket(str(op.control)) as stream:
            # Far more answers than the socket buffers hold, and none of them read.
            start = trio.current_time()
            with trio.move_on_after(SEND_TIMEOUT * 3):  # our own send stalls once it hangs up
                try:
                    await stream.send_all(b'{"command": "status"}\n' * 4000)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await op.log.wait_for("did not read its answer")
            assert trio.current_time() - start >= SEND_TIMEOUT
        assert (await control_counters(op))["ended"] == {"answer not read": 1}


async def test_a_silent_client_is_disconnected_after_the_idle_time_out(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with operated(tmp_path) as op:
        async with await trio.open_unix_socket(str(op.control)) as stream:
            start = trio.current_time()
            assert await stream.receive_some(1) == b""  # the backend hangs up
            assert trio.current_time() - start == pytest.approx(IDLE_TIMEOUT)
        assert (await control_counters(op))["ended"] == {"idle": 1}


async def test_a_client_cancelled_in_the_middle_of_an_unassign(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Ctrl-C on ``pciback ctl unassign`` while the guest has not acknowledged."""
    async with operated(tmp_path) as op:
        registry = op.backend.registry
        with trio.CancelScope() as ctrl_c:
            async with await trio.open_unix_socket(str(op.control)) as stream:
                await stream.send_all(b'{"command": "unassign", "device": "edu-b"}\n')
                await trio.testing.wait_all_tasks_blocked()
                assert registry.get("edu-b").leaving == "beta"  # waiting for beta's ack
                ctrl_c.cancel()
                await read_line(stream)
        # The unassign the client started runs to its end: forced after ack_timeout,
        # the device reset and free; only then does the answer find no reader.
        await op.log.wait_for("the client left before its answer")
        dev = registry.get("edu-b")
        assert dev.guest is None and dev.leaving is None
        assert op.backend.hotplug.forced_removals == 1
        assert (await control_counters(op))["ended"] == {"client went away": 1}
        assert (await request(op.control, {"command": "assign", "device": "edu-b",
                                           "guest": "alpha"}))["ok"]


async def test_many_clients_at_once(tmp_path: Path) -> None:
    """Three times as many clients as are served at once: a third leave without reading,
    a third send half a line, a third wait for their answer (the status or ``BUSY``)."""
    clients = 3 * MAX_CONNECTIONS
    async with operated(tmp_path) as op:
        answers: list[Any] = []

        async def client(n: int, stream: trio.SocketStream) -> None:
            async with stream:
                try:
                    if n % 3 == 0:
                        await stream.send_all(b'{"command": "status"}\n')
                    elif n % 3 == 1:
                        await stream.send_all(b'{"command": "sta')
                    else:
                        await stream.send_all(b'{"command": "status"}\n')
                        answers.append(json.loads(await read_line(stream)))
                except trio.BrokenResourceError:
                    pass  # turned away (BUSY) before we sent: nothing to read

        async with trio.open_nursery() as nursery:
            # Every connection is open before any client sends a byte.
            streams = [await trio.open_unix_socket(str(op.control)) for _ in range(clients)]
            await trio.testing.wait_all_tasks_blocked()
            for n, stream in enumerate(streams):
                nursery.start_soon(client, n, stream)
        await trio.testing.wait_all_tasks_blocked()
        counters = await control_counters(op)
        assert counters["connections"] == clients + 1
        assert counters["refused"] == clients - MAX_CONNECTIONS
        ok = [a for a in answers if a["ok"]]
        assert len(ok) + sum(a.get("code") == "BUSY" for a in answers) == len(answers)
        assert ok
        assert counters["active"] == 1


async def test_a_bug_while_answering_ends_that_connection_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The net under the control connection: an unexpected exception (a bug) is contained."""

    async def broken(self: ControlApi, request: dict[str, Any]) -> Any:
        raise RuntimeError("a bug in a command handler")

    monkeypatch.setattr(ControlApi, "_hide", broken)
    async with operated(tmp_path) as op:
        async with await trio.open_unix_socket(str(op.control)) as stream:
            await stream.send_all(b'{"command": "hide", "device": "edu-a"}\n')
            assert await stream.receive_some(1) == b""  # closed, no answer
        await op.log.wait_for("failed unexpectedly (a bug)")
        (line,) = op.log.lines("failed unexpectedly (a bug)")
        assert line.levelno == logging.ERROR and line.exc_info is not None
        assert (await control_counters(op))["ended"] == {"unexpected error": 1}
