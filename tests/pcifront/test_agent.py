"""``pcifront agent`` against a real backend process that is killed with SIGKILL and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.configs import edu_config, listen_line
from tests.support.serve import Lines, ServeFactory

pytestmark = pytest.mark.slow

#: Generous: the point is that the agent comes back, not how fast (benchmarks measure speed).
DEADLINE = 60.0

def _spawn(*args: str, cwd: Path, stderr: IO[str]) -> subprocess.Popen[str]:
    """Run ``python -m ARGS`` (the agent), its stdout a pipe."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr,
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


def _config(tmp_path: Path, *, both: bool) -> str:
    """alpha owns edu0; edu1 is alpha's too with ``both``, else spare."""
    return listen_line(f"unix:{tmp_path / 'pciback.sock'}") + edu_config(
        ["alpha"], {"edu0": "alpha", "edu1": "alpha" if both else None}
    )


def test_agent_reconnects_after_the_backend_is_killed_and_reenumerates(
    tmp_path: Path, processes: list[subprocess.Popen[str]], serve_pciback: ServeFactory
) -> None:
    backend = serve_pciback(config=_config(tmp_path, both=False))
    agent = _spawn(
        "pcifront.cli", "agent", "--connect", f"unix:{tmp_path / 'pciback.sock'}",
        "--guest", "alpha", "--json", "--retry-initial", "0.05", "--retry-max", "0.5",
        cwd=tmp_path, stderr=(tmp_path / "agent.log").open("w"),
    )
    processes.append(agent)
    assert agent.stdout is not None
    out = Lines(agent.stdout)

    def event() -> dict[str, Any]:
        return json.loads(out.next(DEADLINE))  # type: ignore[no-any-return]

    assert event()["event"] == "connected"
    present = event()
    assert (present["event"], present["address"], present["vendor_id"]) == (
        "present", "0000:00:00.0", "1234"
    )

    assert backend.stop(signal.SIGKILL) == -signal.SIGKILL
    down = event()
    assert down["event"] == "down"

    # The backend comes back (stale socket and all) with edu1 assigned as well.
    serve_pciback(config=_config(tmp_path, both=True))
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
    tmp_path: Path, processes: list[subprocess.Popen[str]], serve_pciback: ServeFactory
) -> None:
    address = serve_pciback(config=_config(tmp_path, both=True)).address("unix")
    agent = _spawn(
        "pcifront.cli", "agent", "--connect", address, "--guest", "alpha",
        cwd=tmp_path, stderr=(tmp_path / "agent.log").open("w"),
    )
    processes.append(agent)
    assert agent.stdout is not None
    out = Lines(agent.stdout)
    assert out.next(DEADLINE) == f"connected {address} alpha"
    assert out.next(DEADLINE) == "present 0000:00:00.0 1234:11e8 class 00ff00"
    assert out.next(DEADLINE) == "present 0000:00:01.0 1234:11e8 class 00ff00"
    agent.send_signal(signal.SIGINT)
    assert out.next(DEADLINE) == "stopped SIGINT"
    assert agent.wait(timeout=DEADLINE) == 0

    refused = subprocess.run(
        [sys.executable, "-m", "pcifront.cli", "agent", "--connect", address, "--guest", "nobody"],
        cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE,
    )
    assert refused.returncode == 1
    assert "UNKNOWN_GUEST" in refused.stderr and refused.stdout == ""
