"""Issue 8, stalls: nothing a guest controls may block the backend's event loop.

Each test is the reproduction from the issue. On the code before the fix the
event loop blocked (for good, or until the test's watchdog let it go), so the
honest guest's latency, measured on the wall clock, is what fails.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from _limits_support import EDU, IRQ_ACK, IRQ_RAISE, TWO_GUESTS, bar_write, raw_guest, worst_latency

import pcifront
from pciback.guests._accept import ACCEPT_BACKOFF, AcceptStatistics, accept_loop
from pciback.testing import TEST_TOKEN, running_backend
from shared.evtchn import GUARD_SECONDS
from shared.evtchn._guard import ffi, guarded_read, lib
from shared.protocol import (
    IRQ_MODE_INTX,
    Connection,
    InterruptEnableRequest,
    InterruptEoiRequest,
    Limits,
    PingRequest,
    Role,
    ValueReply,
    Welcome,
)
from shared.transport import (
    FrameListener,
    FrameTransport,
    TransportOptions,
    memory_transport_pair,
    open_transport,
)
from shared.transport._shm import ShmTransport
from tests.support.tls import TlsFiles

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


def test_read_of_a_blocking_empty_eventfd_returns_at_once() -> None:
    # The guest cleared O_NONBLOCK and drained the counter: a plain read would block
    # the event loop until someone writes. preadv2(RWF_NOWAIT) (or, on kernels without
    # it for eventfds, the timer guard) returns "nothing" instead, and a value written
    # meanwhile is still read whole.
    fd = os.eventfd(0)  # blocking
    try:
        # Unfixed code: a write after 3 s unblocks the read; fail on latency, never hang.
        rescue = threading.Timer(3.0, lambda: os.eventfd_write(fd, 1))
        rescue.start()
        try:
            start = time.monotonic()
            assert guarded_read(fd) == 0
            assert time.monotonic() - start < 0.5
        finally:
            rescue.cancel()
        os.eventfd_write(fd, 5)
        assert guarded_read(fd) == 5
        assert guarded_read(fd) == 0
        buf = ffi.new("uint64_t *")
        # The fast path itself: EAGAIN here, or EOPNOTSUPP where the kernel lacks it.
        assert lib.pcisplit_nowait_read(fd, buf, 8) in (-errno.EAGAIN, -errno.EOPNOTSUPP)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_interrupt_eventfd_made_blocking_and_full_stalls_nobody(
    kind: str, tmp_path: Path
) -> None:
    async with (
        running_backend(TWO_GUESTS, transports=(kind,), tmp=tmp_path) as rb,
        pcifront.connect(rb.address(kind), guest="victim", token=TEST_TOKEN) as victim,
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


#: Seconds the toggling guest holds its eventfd blocking and full: longer than the
#: latency bound, so a write that got past the poll would fail the test.
TOGGLE_HOLD = 1.5

_TOGGLER = """
import os, sys, time
fd, hold, rounds = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
for _ in range(rounds):
    # Blocking and full for a while: a write that gets past the poll would hang here.
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    os.eventfd_write(fd, 0xFFFFFFFFFFFFFFFE)
    os.set_blocking(fd, True)
    time.sleep(hold)
    os.set_blocking(fd, False)
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    # Then flip the flag as fast as possible, filling and draining as it goes.
    end = time.monotonic() + hold
    while time.monotonic() < end:
        os.set_blocking(fd, True)
        os.set_blocking(fd, False)
        try:
            os.eventfd_read(fd)
            os.eventfd_write(fd, 0xFFFFFFFFFFFFFFFE)
        except BlockingIOError:
            pass
"""


async def test_a_guest_process_toggling_o_nonblock_stalls_nobody(tmp_path: Path) -> None:
    async with (
        running_backend(TWO_GUESTS, transports=("unix",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("unix"), guest="victim", token=TEST_TOKEN) as victim,
        raw_guest(rb.address("unix"), "mallory") as mallory,
    ):
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        proc = None
        try:
            reply = await mallory.request(
                lambda rid: InterruptEnableRequest(rid, EDU, IRQ_MODE_INTX, 1, True), [efd]
            )
            assert isinstance(reply, ValueReply)
            (session,) = [s for s in rb.backend.sessions if s.guest == "mallory"]
            # Another process shares the file description, as a guest VM's agent would.
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", _TOGGLER, str(efd), str(TOGGLE_HOLD), "2"],
                pass_fds=[efd],
                stdout=subprocess.PIPE,
            )
            assert proc.stdout is not None
            with trio.fail_after(30):
                assert await proc.stdout.receive_some(5) == b"ready"
            worst = 0.0
            with unblock_after(10.0, efd):
                while proc.poll() is None:
                    start = time.monotonic()
                    # If the backend drops her mid-request, no reply ever comes.
                    with trio.move_on_after(LATENCY_BOUND * 5) as dropped:
                        try:
                            await bar_write(mallory, IRQ_RAISE, 1)  # delivered at once
                            await bar_write(mallory, IRQ_ACK, 1)
                            await mallory.ok(lambda rid: InterruptEoiRequest(rid, EDU, 0))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            dropped.cancel()
                    if dropped.cancel_called:
                        break  # the backend caught her making a write block: dropped
                    await worst_latency(victim, rounds=2)
                    worst = max(worst, time.monotonic() - start)
            stats = session.outbox.statistics()
            assert stats.counter_full > 0  # she did hold it full while we delivered
            if stats.stalled:
                # She won the race once (filled it between our poll and our write):
                # the write was cut short after 2 ms and she was disconnected.
                assert stats.stalled == 1
                assert rb.backend.stats.disconnects_for_misbehaviour == 1
            assert worst < LATENCY_BOUND
            assert await worst_latency(victim) < LATENCY_BOUND
        finally:
            if proc is not None:
                proc.kill()
                await proc.wait()
            os.close(efd)


async def test_shm_doorbell_made_blocking_and_full_stalls_nobody(tmp_path: Path) -> None:
    async with (
        running_backend(TWO_GUESTS, transports=("shm",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("shm"), guest="victim", token=TEST_TOKEN) as victim,
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


# --------------------------------------------------------------------------- stall 7: TLS


async def test_a_silent_tcp_client_on_the_tls_port_blocks_no_one(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    config, client_ctx = tls_files.section + TWO_GUESTS, tls_files.client_context("victim")
    async with running_backend(config, transports=("tls",), tmp=tmp_path) as rb:
        host, port = rb.address("tls").removeprefix("tls://").rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)):  # connects, sends nothing
            await trio.testing.wait_all_tasks_blocked()
            options = TransportOptions(ssl_context=client_ctx)
            # Before the fix the accept loop sat in this client's handshake: no one got in.
            with trio.fail_after(LATENCY_BOUND * 5):
                async with pcifront.connect(
                    rb.address("tls"), guest="victim", token=TEST_TOKEN, options=options
                ) as bus:
                    await worst_latency(bus)


# --------------------------------------------------------------------------- stall 8: EMFILE


class _ScriptedListener(FrameListener):
    """accept() follows a script: "emfile" fails, "ok" hands out a transport, a number
    waits that many seconds first; after the script it waits forever."""

    address = "fake:exhausted"

    def __init__(self, script: list[str | float]) -> None:
        self.script = script
        self.failures: list[float] = []

    async def accept(self) -> FrameTransport:
        await trio.lowlevel.checkpoint()
        while self.script:
            step = self.script.pop(0)
            if isinstance(step, float):
                await trio.sleep(step)
            elif step == "emfile":
                self.failures.append(trio.current_time())
                raise OSError(errno.EMFILE, "Too many open files")
            else:
                a, _ = memory_transport_pair()
                return a
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_accept_backs_off_and_logs_once_per_episode(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # 50 failures, then fds are free again; then a flapping stretch at the limit
    # (fail, ok, fail, ok...), which is one more episode, not one per connection.
    flapping: list[str | float] = ["emfile", "ok"] * 20
    listener = _ScriptedListener(["emfile"] * 50 + [2.0, "ok", 2.0] + flapping + [2.0, "ok"])
    stats = AcceptStatistics()
    handled: list[FrameTransport] = []
    with trio.move_on_after(600):
        await accept_loop(listener, handled.append, stats)
    assert len(handled) == 22
    assert (stats.capacity_episodes, stats.capacity_failures) == (2, 70)
    gaps = [b - a for a, b in itertools.pairwise(listener.failures[:50])]
    assert min(gaps) >= ACCEPT_BACKOFF - 1e-9  # never a retry without a pause
    lines = [r.getMessage() for r in caplog.records if r.name == "pcisplit.backend"]
    assert len(lines) == 4  # each episode: began, ended (with its count)
    assert "EMFILE" in lines[0] and "after 50 failed attempts" in lines[1]
    assert "EMFILE" in lines[2] and "after 20 failed attempts" in lines[3]


_EXHAUSTED_BACKEND = """
import logging, resource, sys, trio
from pciback.config import parse_config
from pciback.service import Backend

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
config = parse_config(sys.argv[1])

async def main():
    backend = Backend(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        # Leave room for a few connections only, then say we are ready.
        import os
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 8, used + 8))
        print("ready", flush=True)

trio.run(main)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_out_of_fds_the_backend_neither_spins_nor_floods_the_log(tmp_path: Path) -> None:
    sock = tmp_path / "pciback.sock"
    config = f"listen = ['unix:{sock}']\n[limits]\nhandshake_timeout = 60.0\n{TWO_GUESTS}"
    log_path = tmp_path / "backend.log"
    with open(log_path, "wb") as log_file:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", _EXHAUSTED_BACKEND, config],
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        assert proc.stdout is not None
        with trio.fail_after(30):
            assert (await proc.stdout.receive_some(6)).startswith(b"ready")
        held = []
        for _ in range(20):  # more than the 8 fds left: accept() starts failing with EMFILE
            held.append(await trio.open_unix_socket(str(sock)))
        await trio.sleep(0.5)  # let the accept loop hit the limit
        cpu_before, log_before = _cpu_seconds(proc.pid), log_path.stat().st_size
        await trio.sleep(1.0)  # measuring: how much CPU and log does one second cost?
        cpu = _cpu_seconds(proc.pid) - cpu_before
        logged = log_path.stat().st_size - log_before
        assert cpu < 0.5, f"the accept loop spun: {cpu:.2f} s of CPU in 1 s"
        assert logged < 2000, f"{logged} bytes of log in 1 s"
        assert b"EMFILE" in log_path.read_bytes()
        for stream in held:
            await trio.aclose_forcefully(stream)
        # Descriptors are free again: guests get in.
        with trio.fail_after(30):
            async with pcifront.connect(f"unix:{sock}", guest="victim", token=TEST_TOKEN) as bus:
                assert await worst_latency(bus) < LATENCY_BOUND
    finally:
        proc.kill()
        await proc.wait()
