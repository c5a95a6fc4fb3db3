"""The hostile-guest harness: a real backend process, a well-behaved guest, and the checks.

Every attack test in this directory follows one shape::

    async def test_something(backend, kind):
        async with sentinel(backend, kind):        # guest0 connected throughout
            async with hostile(backend, kind) as h:  # the attacker (guest1)
                ...attack...
        # leaving `sentinel` asserted: the backend is alive, guest0 got correct
        # answers within LATENCY_BOUND during and after the attack, and the
        # backend's fds and RSS came back within FD_SLACK and RSS_SLACK.

``backend`` is one :class:`BackendProcess` (``_backend_proc.py``: the real
``pciback`` service in its own process) listening on ``unix:``, ``shm:`` and
``tcp://`` at once; ``kind`` parametrises a test over those three. The process
is shared by the tests of a session and replaced whenever an attack killed or
wedged it, so one strict-xfail crash does not take the following tests down.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from _hostile import guest_token

import pcifront
from pcifront import ConnectionLostError, RequestError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: Transports every attack runs over.
KINDS = ("unix", "shm", "tcp")

#: guest0's answers must come within this many seconds, during and after an attack. Generous:
#: the suite catches stalls (a blocked event loop never answers), it does not measure speed.
LATENCY_BOUND = 3.0
#: After an attack the backend's fd count must return to its count before it, plus this many.
FD_SLACK = 0
#: ... and its RSS to at most this many bytes above the RSS before the attack (CPython keeps
#: freed arenas, so RSS is only expected to stop growing, not to shrink).
RSS_SLACK = 24 << 20
#: How long the backend gets to close an attacker's connections and free what they held.
SETTLE_SECONDS = 5.0

EDU_ID = 0x11E81234  # edu vendor/device id (config dword 0)
EDU_BAR_ID = 0x010000ED  # edu BAR0 register 0: the identification register

CONFIG = """
listen = [{listen}]

[[guest]]
name = "guest0"
allow_plain_tcp = true
token_file = "guest0.token"

[[guest]]
name = "guest1"
allow_plain_tcp = true
token_file = "guest1.token"

# guest2 and guest3 drive edu2 and edu3 over vfio-user only (test_sec_vfio_user.py): a
# guest of their own each, so the native guests' buses stay as the other tests expect.
[[guest]]
name = "guest2"

[[guest]]
name = "guest3"

[[device]]
id = "edu0"
kind = "emulated"
model = "edu"
guest = "guest0"

[[device]]
id = "edu1"
kind = "emulated"
model = "edu"
guest = "guest1"

[[device]]
id = "msix1"
kind = "emulated"
model = "sec-msix"
guest = "guest1"

[[device]]
id = "edu2"
model = "edu"
guest = "guest2"
vfio_user = "edu2.sock"

[[device]]
id = "edu3"
model = "edu"
guest = "guest3"
vfio_user = "edu3.sock"

[dma]
call_timeout = 2.0
"""


class BackendProcess:
    """One ``_backend_proc.py`` process and what ``/proc`` says about it."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        listen = [f"unix:{workdir / 'b.sock'}", f"shm:{workdir / 'b-shm.sock'}", "tcp://127.0.0.1:0"]
        config = workdir / "backend.toml"
        for guest in ("guest0", "guest1"):
            (workdir / f"{guest}.token").write_bytes(guest_token(guest))
            (workdir / f"{guest}.token").chmod(0o600)
        config.write_text(CONFIG.format(listen=", ".join(json.dumps(a) for a in listen)))
        self.log_path = workdir / "backend.log"
        self._log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_backend_proc.py"), str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=workdir,
            env=env,
        )
        self.pid = self.proc.pid
        self._pending = b""
        first = self._line(timeout=30.0)
        self.addresses: list[str] = json.loads(first)["addresses"]

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"backend {self.pid} did not answer within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"backend {self.pid} exited:\n{self.log_tail()}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def address(self, kind: str) -> str:
        for address in self.addresses:
            if address.startswith(kind + ":"):
                return address
        raise LookupError(f"backend listens on {self.addresses}, not on {kind}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The backend's counters (``_backend_proc.snapshot``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._line(timeout))
        return result

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_targets(self) -> list[str]:
        out = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{self.pid}/fd/{name}"))
            except FileNotFoundError:
                continue
        return sorted(out)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise LookupError("no VmRSS in /proc/PID/status")

    def memfd_maps(self) -> int:
        """Mappings of memfds (shm rings, DMA windows) in the backend's address space."""
        text = Path(f"/proc/{self.pid}/maps").read_text()
        return sum(1 for line in text.splitlines() if "/memfd:" in line)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


class BackendPool:
    """Hands out a live backend; replaces one that died or was marked suspect."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.current: BackendProcess | None = None
        self.started = 0
        self.suspect = False

    def get(self) -> BackendProcess:
        cur = self.current
        if cur is not None and (self.suspect or not cur.alive()):
            cur.stop()
            cur = None
        if cur is None:
            self.started += 1
            cur = self.current = BackendProcess(self.root / f"backend-{self.started}")
            self.suspect = False
        return cur

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture(scope="session")
def backend_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendPool]:
    pool = BackendPool(tmp_path_factory.mktemp("security"))
    yield pool
    pool.close()


@pytest.fixture
def backend(backend_pool: BackendPool, request: pytest.FixtureRequest) -> Iterator[BackendProcess]:
    proc = backend_pool.get()
    yield proc
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.passed or not proc.alive():
        # A failed (or xfailed) attack may have left the backend dying or wedged.
        backend_pool.suspect = True


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ----------------------------------------------------------------------------- the sentinel


@dataclass
class Watch:
    """What the well-behaved guest saw while the attack ran."""

    backend: BackendProcess
    bus: pcifront.Bus
    fds_before: int
    rss_before: int
    probes: int = 0
    worst_latency: float = 0.0
    failures: list[str] = field(default_factory=list)


async def probe(bus: pcifront.Bus) -> None:
    """One round of guest0 work whose answers are known: config, BAR and ping."""
    dev = bus.devices[0]
    value = await dev.config_read(0, 4)
    assert value == EDU_ID, f"guest0 read config dword 0 = {value:#x}, expected {EDU_ID:#x}"
    bar = await dev.bar_read(0, 0, 4)
    assert bar == EDU_BAR_ID, f"guest0 read edu BAR0[0] = {bar:#x}, expected {EDU_BAR_ID:#x}"
    await bus.ping()


async def _probe_loop(watch: Watch, bus: pcifront.Bus, latency: float, stop: trio.Event) -> None:
    # Stopped between probes, never cancelled inside one: a request cancelled half-sent
    # breaks guest0's stream, which would look like damage done by the attack.
    while not stop.is_set():
        start = trio.current_time()
        try:
            with trio.fail_after(latency):
                await probe(bus)
        except (trio.TooSlowError, ConnectionLostError, RequestError, AssertionError) as exc:
            watch.failures.append(f"probe {watch.probes}: {type(exc).__name__}: {exc}")
            return
        took = trio.current_time() - start
        watch.worst_latency = max(watch.worst_latency, took)
        watch.probes += 1
        with trio.move_on_after(0.02):  # pacing only: the loop runs for the whole attack
            await stop.wait()


async def _settle(backend: BackendProcess, fds_limit: int) -> int:
    deadline = trio.current_time() + SETTLE_SECONDS
    while True:
        fds = backend.fds()
        if fds <= fds_limit or trio.current_time() > deadline:
            return fds
        await trio.sleep(0.05)


def _record(watch: Watch, fds_after: int, rss_after: int) -> None:
    """With ``SEC_REPORT=FILE``, append what this attack did to the backend (docs figures)."""
    path = os.environ.get("SEC_REPORT")
    if not path:
        return
    entry = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
        "fds_before": watch.fds_before,
        "fds_after": fds_after,
        "rss_before": watch.rss_before,
        "rss_after": rss_after,
        "worst_latency": round(watch.worst_latency, 4),
        "probes": watch.probes,
    }
    with open(path, "a") as out:
        out.write(json.dumps(entry) + "\n")


@asynccontextmanager
async def sentinel(
    backend: BackendProcess,
    kind: str,
    *,
    latency: float = LATENCY_BOUND,
    fd_slack: int = FD_SLACK,
    rss_slack: int = RSS_SLACK,
) -> AsyncIterator[Watch]:
    """Keep guest0 connected and probing over ``kind`` around an attack; then check everything.

    Asserts on exit: the backend process is alive; every probe of guest0 during the attack
    and one after it answered correctly within ``latency`` seconds; the backend's fd count is
    back to at most its count before the attack plus ``fd_slack``; its RSS grew by at most
    ``rss_slack`` bytes.
    """
    assert backend.alive(), f"backend died before the attack:\n{backend.log_tail()}"
    async with pcifront.connect(
        backend.address(kind), guest="guest0", timeout=latency, token=guest_token("guest0")
    ) as bus:
        await probe(bus)
        watch = Watch(backend, bus, fds_before=backend.fds(), rss_before=backend.rss())
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_probe_loop, watch, bus, latency, stop)
            try:
                yield watch
            finally:
                stop.set()
        alive = backend.alive()
        assert alive, f"the backend died during the attack:\n{backend.log_tail()}"
        assert not watch.failures, (
            f"guest0 was disturbed during the attack: {watch.failures}\n{backend.log_tail()}"
        )
        start = trio.current_time()
        try:
            with trio.fail_after(latency):
                await probe(bus)
        except (trio.TooSlowError, ConnectionLostError, RequestError) as exc:
            raise AssertionError(
                f"guest0 got no correct answer within {latency} s after the attack: {exc!r}\n"
                f"{backend.log_tail()}"
            ) from exc
        watch.worst_latency = max(watch.worst_latency, trio.current_time() - start)
        assert watch.worst_latency <= latency
    # guest0 is gone too now: compare with the count before it connected plus its own fds.
    fds = await _settle(backend, watch.fds_before + fd_slack)
    assert fds <= watch.fds_before + fd_slack, (
        f"backend holds {fds} fds after the attack, {watch.fds_before} before "
        f"(slack {fd_slack}): {backend.fd_targets()}"
    )
    rss = backend.rss()
    _record(watch, fds, rss)
    assert rss <= watch.rss_before + rss_slack, (
        f"backend RSS {rss >> 20} MiB after the attack, {watch.rss_before >> 20} MiB before "
        f"(slack {rss_slack >> 20} MiB)"
    )
    assert backend.alive()
