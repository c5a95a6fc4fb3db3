"""The service's life as a real process: sd_notify, SIGHUP reload, SIGTERM; `pciback check`."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pciback.cli import JsonLogFormatter, main
from pciback.ops.lifecycle import sd_notify

PCIBACK = Path(sys.executable).parent / "pciback"
TIMEOUT = 30.0  # a stall guard for a real process, not a speed target

CONFIG = """
listen = ["unix:{sock}"]
[[guest]]
name = "alpha"
[[guest]]
name = "beta"
[[device]]
id = "edu-a"
model = "edu"
guest = "{owner}"
"""


class Lines:
    """Lines of a pipe, read with a time-out (no buffering behind select's back)."""

    def __init__(self, stream: object) -> None:
        assert hasattr(stream, "fileno")
        self.fd = stream.fileno()
        self.buffer = b""

    def next(self, timeout: float = TIMEOUT) -> str:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, "the backend printed nothing in time"
            data = os.read(self.fd, 65536)
            assert data, f"the backend closed the pipe; so far: {self.buffer!r}"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode() + "\n"


class Notifications:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(TIMEOUT)

    def next(self) -> str:
        return self.sock.recv(4096).decode()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notifications]:
    n = Notifications(tmp_path / "notify.sock")
    yield n
    n.sock.close()


def _ctl_list(tmp: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    assert main(["ctl", "--control", str(tmp / "pciback.ctl"), "list", "--json"]) == 0
    return {row["id"]: row for row in json.loads(capsys.readouterr().out)["result"]}


def test_sd_notify_is_a_no_op_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


def test_sd_notify_sends_the_state(
    notify: Notifications, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    assert sd_notify("READY=1") is True
    assert notify.next() == "READY=1"


def test_json_log_lines() -> None:
    record = logging.LogRecord("pcisplit.backend", logging.WARNING, "x", 1, "a %s", ("b",), None)
    entry = json.loads(JsonLogFormatter().format(record))
    shown = (entry["level"], entry["logger"], entry["message"])
    assert shown == ("WARNING", "pcisplit.backend", "a b")


@pytest.mark.slow
def test_sighup_reassigns_refuses_a_bad_config_and_sigterm_stops_cleanly(
    tmp_path: Path, notify: Notifications, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "backend.toml"
    sock = tmp_path / "pciback.sock"
    config.write_text(CONFIG.format(sock=sock, owner="alpha"))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
    proc = subprocess.Popen(
        [str(PCIBACK), "serve", "--config", str(config), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    out, err = Lines(proc.stdout), Lines(proc.stderr)

    def said() -> str:
        """The next line on stdout: a JSON object (--log-format json), its message."""
        entry = json.loads(out.next())
        assert {"time", "level", "logger", "message"} <= set(entry)
        assert (entry["level"], entry["logger"]) == ("INFO", "pciback")
        return str(entry["message"])

    try:
        assert said() == f"listening on unix:{sock}"
        summary = said()
        assert summary.startswith("serving 2 guest(s), 1 device(s) (1 assigned, 0 hidden)")
        assert summary.rstrip().endswith(f"control socket {tmp_path / 'pciback.ctl'}")
        assert notify.next() == "READY=1"
        assert _ctl_list(tmp_path, capsys)["edu-a"]["owner"] == "alpha"

        # A reassignment: applied as hot-plug.
        config.write_text(CONFIG.format(sock=sock, owner="beta"))
        proc.send_signal(signal.SIGHUP)
        assert notify.next().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert said() == f"reloaded {config}: edu-a: alpha -> beta"
        assert notify.next() == "READY=1"
        assert _ctl_list(tmp_path, capsys)["edu-a"]["owner"] == "beta"

        # A config that does not validate: refused, the running one stays.
        config.write_text(CONFIG.format(sock=sock, owner="gamma"))
        proc.send_signal(signal.SIGHUP)
        assert notify.next().startswith("RELOADING=1")
        # Every stderr line is JSON too; the refusal is said once, as an error.
        entries = []
        while not entries or not entries[-1]["message"].startswith("reload refused"):
            entries.append(json.loads(err.next()))
            assert {"time", "level", "logger", "message"} <= set(entries[-1])
        refused = entries[-1]
        assert (refused["level"], refused["logger"]) == ("ERROR", "pciback")
        assert "device[0].guest: guest 'gamma' is not declared" in refused["message"]
        assert not any("refused" in e["message"] for e in entries[:-1])
        assert notify.next() == "READY=1"
        assert _ctl_list(tmp_path, capsys)["edu-a"]["owner"] == "beta"

        proc.send_signal(signal.SIGTERM)
        assert said() == "SIGTERM received, shutting down"
        assert notify.next() == "STOPPING=1"
        assert proc.wait(timeout=TIMEOUT) == 0
        assert said() == "stopped"
        # Nothing said twice: the refusal was on stderr only, and stderr was all JSON.
        assert proc.stderr is not None
        rest = (err.buffer + proc.stderr.read()).decode()
        assert all(json.loads(line) for line in rest.splitlines())
        assert "reload refused" not in rest
        assert not sock.exists() and not (tmp_path / "pciback.ctl").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- pciback check


def test_check_accepts_a_good_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = Path(__file__).resolve().parents[1] / "data/pcidata/eth_intel_82576_sriov.txt"
    (tmp_path / "nic.txt").write_text(dump.read_text())
    (tmp_path / "g.token").write_text("0123456789abcdef0123\n")
    (tmp_path / "g.token").chmod(0o600)
    config = tmp_path / "good.toml"
    config.write_text(
        'listen = ["unix:/run/pcisplit/b.sock", "tcp://127.0.0.1:7070"]\n'
        "[[guest]]\nname='g'\ntoken_file='g.token'\nallow_plain_tcp=true\n"
        "[[device]]\nid='nic'\nkind='snapshot'\ndump='nic.txt'\nguest='g'\n"
    )
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"pciback: {config} is valid: 1 guest(s), 1 device(s), listening on "
        "unix:/run/pcisplit/b.sock, tcp://127.0.0.1:7070\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[device]]\nid='nic'\nkind='snapshot'\ndump='missing.txt'\n", "device[0] (nic): cannot"),
        ("listen=1\n", "listen: expected a list of address strings"),
        ("listen=['tls://0.0.0.0:1']\n[tls]\ncert='c.pem'\nkey='k.pem'\nca='ca.pem'\n", "tls.cert"),
        ("[[guest]]\nname='g'\ntoken_file='none'\n", "guest[0].token_file: cannot read"),
        ("[[device]]\nid='e'\nmodel='edu'\nhide_capabilities=['msi', 'nope']\n", "nope"),
    ],
)
def test_check_refuses_a_bad_config_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pciback: ") and message in err, err
