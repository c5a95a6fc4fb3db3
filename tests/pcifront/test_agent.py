"""``pcifront agent`` against a real backend process that is killed with SIGKILL and restarted."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

pytestmark = pytest.mark.slow

#: Generous: the point is that the agent comes back, not how fast (benchmarks measure speed).
DEADLINE = 60.0

CONFIG = """
listen = ["unix:{sock}"]
[[guest]]
name = "alpha"
[[device]]
id = "edu0"
model = "edu"
guest = "alpha"
[[device]]
id = "edu1"
model = "edu"
{edu1_guest}
"""


class Lines:
    """Lines of a child's stream, read by a thread, taken with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self) -> str:
        try:
            line = self._queue.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no line within {DEADLINE} s; so far: {self.seen}") from None
        if line is None:
            raise AssertionError(f"the stream ended; so far: {self.seen}")
        self.seen.append(line)
        return line

    def until(self, needle: str) -> str:
        while True:
            line = self.next()
            if needle in line:
                return line


def _spawn(*args: str, cwd: Path, stderr: IO[str] | None = None) -> subprocess.Popen[str]:
    """Run ``python -m ARGS``; stderr joins stdout unless a file is given."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stderr is None else stderr,
        text=True,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)


def _backend(tmp_path: Path, procs: list[Any], *, both: bool) -> tuple[Any, Lines]:
    config = tmp_path / "backend.toml"
    config.write_text(
        CONFIG.format(sock=tmp_path / "pciback.sock", edu1_guest='guest = "alpha"' if both else "")
    )
    proc = _spawn("pciback.cli", "serve", "--config", str(config), cwd=tmp_path)
    procs.append(proc)
    lines = Lines(proc.stdout)  # type: ignore[arg-type]
    lines.until("pciback: listening on unix:")
    return proc, lines


def test_agent_reconnects_after_the_backend_is_killed_and_reenumerates(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    backend, _ = _backend(tmp_path, processes, both=False)
    agent = _spawn(
        "pcifront.cli", "agent", "--connect", f"unix:{tmp_path / 'pciback.sock'}",
        "--guest", "alpha", "--json", "--retry-initial", "0.05", "--retry-max", "0.5",
        cwd=tmp_path, stderr=(tmp_path / "agent.log").open("w"),
    )
    processes.append(agent)
    out = Lines(agent.stdout)  # type: ignore[arg-type]

    def event() -> dict[str, Any]:
        return json.loads(out.next())  # type: ignore[no-any-return]

    assert event()["event"] == "connected"
    present = event()
    assert (present["event"], present["address"], present["vendor_id"]) == (
        "present", "0000:00:00.0", "1234"
    )

    backend.send_signal(signal.SIGKILL)
    backend.wait(timeout=DEADLINE)
    down = event()
    assert down["event"] == "down"

    # The backend comes back (stale socket and all) with edu1 assigned as well.
    _backend(tmp_path, processes, both=True)
    up = event()
    assert up["event"] == "up" and up["attempt"] >= 1
    added = event()
    assert (added["event"], added["address"], added["reason"]) == (
        "added", "0000:00:01.0", "re-enumerated after reconnecting"
    )

    agent.send_signal(signal.SIGTERM)
    assert event() == {"event": "stopped", "detail": "SIGTERM"}
    assert agent.wait(timeout=DEADLINE) == 0
    # The log (stderr) says what happened; stdout stayed pure JSON lines.
    log = (tmp_path / "agent.log").read_text()
    assert "connection to the backend lost" in log


def test_agent_text_output_and_a_refused_guest(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    _backend(tmp_path, processes, both=True)
    address = f"unix:{tmp_path / 'pciback.sock'}"
    agent = _spawn(
        "pcifront.cli", "agent", "--connect", address, "--guest", "alpha",
        cwd=tmp_path, stderr=(tmp_path / "agent.log").open("w"),
    )
    processes.append(agent)
    out = Lines(agent.stdout)  # type: ignore[arg-type]
    assert out.next() == f"connected {address} alpha"
    assert out.next() == "present 0000:00:00.0 1234:11e8 class 00ff00"
    assert out.next() == "present 0000:00:01.0 1234:11e8 class 00ff00"
    agent.send_signal(signal.SIGINT)
    assert out.next() == "stopped SIGINT"
    assert agent.wait(timeout=DEADLINE) == 0

    refused = subprocess.run(
        [sys.executable, "-m", "pcifront.cli", "agent", "--connect", address, "--guest", "nobody"],
        cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE,
    )
    assert refused.returncode == 1
    assert "UNKNOWN_GUEST" in refused.stderr and refused.stdout == ""
