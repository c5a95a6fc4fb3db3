"""What `pciback serve` says, and what a refused permission says, as an operator sees it.

- at the default level the log shows guests connecting and ``ctl assign``/``unassign``;
- ``--log-format json`` makes every line JSON, on stdout and stderr, failures too;
- a permission refused names the real cause (``listen_mode``, ``listen_group``,
  the backend's user) instead of asking whether a backend runs, and says it once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
TIMEOUT = 30.0  # a stall guard for real processes
NOBODY = 65534


def _run(
    *argv: str, cwd: Path, prefix: list[str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), str(BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True,
        text=True, timeout=TIMEOUT, **kwargs,
    )


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pcisplit-perm-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def other_user(world_dir: Path) -> list[str]:
    """A command prefix that runs a command as a user who is not the backend's."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to run a command as another user")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import pcifront"], cwd=world_dir,
        capture_output=True, timeout=TIMEOUT,
    )
    if probe.returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot run this checkout's Python: {probe.stderr[-200:]!r}")
    return prefix


class Backend:
    """``pciback serve`` as a process in ``cwd``, stopped with SIGTERM."""

    def __init__(self, cwd: Path, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "pciback"), "serve", *argv],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.out = []
        for line in self.proc.stdout:
            self.out.append(line)
            if "serving" in line:
                break
        assert self.out and "serving" in self.out[-1], (self.out, self.stop())

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return out, err


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    yield started
    for backend in started:
        if backend.proc.poll() is None:
            backend.proc.kill()
            backend.proc.wait()


# --------------------------------------------------------------------------- log level


def test_the_default_level_shows_guests_and_ctl_assign_unassign(
    tmp_path: Path, backends: list[Backend]
) -> None:
    backends.append(backend := Backend(tmp_path))
    lspci = _run("pcifront", "lspci", "--connect", "unix:./pciback.sock", "-n", cwd=tmp_path)
    assert lspci.returncode == 0, lspci.stderr
    assert _run("pciback", "ctl", "unassign", "edu0", cwd=tmp_path).returncode == 0
    assert _run("pciback", "ctl", "assign", "edu0", "guest0", cwd=tmp_path).returncode == 0
    out, err = backend.stop()
    assert out.endswith("pciback: stopped\n")
    assert " INFO unix:./pciback.sock" in err and ": guest guest0 connected\n" in err
    assert " INFO device edu0 removed from guest guest0 and reset\n" in err
    assert " INFO device edu0 assigned to guest guest0 at " in err
    # What serve prints on stdout is not logged a second time.
    assert "listening on" not in err and "control socket at" not in err


def test_quiet_logs_errors_only(tmp_path: Path) -> None:
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # stands in for systemd
    ready.bind(str(tmp_path / "notify.sock"))
    ready.settimeout(TIMEOUT)
    proc = subprocess.Popen(
        [str(BIN / "pciback"), "serve", "-q"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
    )
    try:
        assert ready.recv(4096) == b"READY=1"  # -q prints no startup line
        lspci = _run("pcifront", "lspci", "--connect", "unix:./pciback.sock", cwd=tmp_path)
        assert lspci.returncode == 0, lspci.stderr
    finally:
        ready.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert (out, err) == ("", "")


# --------------------------------------------------------------------------- json lines


def _json_lines(text: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in text.splitlines()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    return entries


def test_log_format_json_makes_every_line_json(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN / "pciback"), "serve", "--log-format", "json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    first = [proc.stdout.readline(), proc.stdout.readline()]
    assert _run("pcifront", "lspci", "--connect", "unix:./pciback.sock", cwd=tmp_path)
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=TIMEOUT)
    said = [e["message"] for e in _json_lines("".join(first) + rest)]
    assert said == [
        "listening on unix:./pciback.sock",
        said[1],
        "SIGTERM received, shutting down",
        "stopped",
    ]
    assert said[1].startswith("serving 1 guest(s), 1 device(s)")
    logged = _json_lines(err)
    assert any(e["message"].endswith("guest guest0 connected") for e in logged)
    assert all(e["logger"].startswith("pcisplit.") for e in logged)


def test_log_format_json_makes_a_failure_json_too(tmp_path: Path) -> None:
    (tmp_path / "pciback.sock").write_text("in the way\n")
    failed = _run("pciback", "serve", "--log-format", "json", cwd=tmp_path)
    assert failed.returncode == 1 and failed.stdout == ""
    (entry,) = _json_lines(failed.stderr)
    assert (entry["level"], entry["logger"]) == ("ERROR", "pciback")
    assert entry["message"].startswith("cannot listen on unix:./pciback.sock: a non-socket file")


# --------------------------------------------------------------------------- permissions


def test_a_guest_refused_by_the_socket_mode_is_pointed_to_listen_mode(
    world_dir: Path, other_user: list[str], backends: list[Backend]
) -> None:
    backends.append(Backend(world_dir, "--listen", "unix:./pciback.sock", "--listen",
                            "shm:./shm.sock"))
    assert stat.S_IMODE((world_dir / "pciback.sock").stat().st_mode) == 0o600
    for address in ("unix:./pciback.sock", "shm:./shm.sock"):
        out = _run("pcifront", "lspci", "--connect", address, cwd=world_dir, prefix=other_user)
        assert out.returncode == 1
        line = out.stderr.strip()
        assert "\n" not in line
        assert line.startswith(f"pcifront: cannot connect to {address}: permission denied: "
                               f"this process (uid {NOBODY}) may not open the socket (owner uid 0")
        assert "mode 0600" in line and 'listen_mode = "0660"' in line and "listen_group" in line
        assert "is `pciback serve` running" not in line


def test_ctl_refused_by_the_control_socket_says_whose_it_is(
    world_dir: Path, other_user: list[str], backends: list[Backend]
) -> None:
    backends.append(Backend(world_dir))
    out = _run("pciback", "ctl", "list", cwd=world_dir, prefix=other_user)
    assert out.returncode == 1
    assert out.stderr == (
        "pciback: cannot reach the control socket pciback.ctl: permission denied: it is only "
        f"for the backend's own user and root (mode 0600), and this is uid {NOBODY}; run "
        "pciback ctl as that user or as root\n"
    )


def test_listen_refused_permission_is_said_once(
    world_dir: Path, other_user: list[str]
) -> None:
    out = _run(
        "pciback", "serve", "--listen", f"unix:{world_dir}/b.sock", "--control",
        "/tmp/never.ctl", cwd=world_dir, prefix=other_user,
    )
    assert out.returncode == 1
    line = out.stderr.strip()
    assert line == (
        f"pciback: cannot listen on unix:{world_dir}/b.sock: Permission denied; uid {NOBODY} "
        "may not create it there (or, below port 1024, bind the port); "
        "run as a user who may, or pick another address"
    )
    assert line.lower().count("permission denied") == 1


def test_the_blocking_client_gives_the_same_permission_message(
    world_dir: Path, other_user: list[str], backends: list[Backend]
) -> None:
    backends.append(Backend(world_dir))
    code = (
        "from pcifront import blocking\n"
        "from shared.errors import PcisplitError\n"
        "try:\n"
        "    blocking.connect('unix:./pciback.sock', guest='guest0')\n"
        "except PcisplitError as exc:\n"
        "    print(exc)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [*other_user, sys.executable, "-c", code], cwd=world_dir, capture_output=True, text=True,
        timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.stdout.startswith(
        "cannot connect to unix:./pciback.sock: permission denied: this process (uid 65534)"
    ), out
