"""The service's life as a real process: sd_notify, SIGHUP reload, SIGTERM; `pciback check`."""

from __future__ import annotations

import json
import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pciback.cli import JsonLogFormatter, main
from pciback.ops.lifecycle import sd_notify
from tests.support.configs import edu_config, listen_line
from tests.support.serve import TIMEOUT, ServeFactory


def _config(sock: Path, owner: str) -> str:
    return listen_line(f"unix:{sock}") + edu_config(["alpha", "beta"], {"edu-a": owner})


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
    tmp_path: Path,
    notify: Notifications,
    capsys: pytest.CaptureFixture[str],
    serve_pciback: ServeFactory,
) -> None:
    sock = tmp_path / "pciback.sock"
    backend = serve_pciback(
        "--log-format", "json",
        config=_config(sock, owner="alpha"),
        env={"NOTIFY_SOCKET": str(notify.path)},
    )
    config, out = backend.config, backend.out
    assert config is not None

    def message(line: str) -> str:
        """A line on stdout: a JSON object (--log-format json); its message."""
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(entry)
        assert (entry["level"], entry["logger"]) == ("INFO", "pciback")
        return str(entry["message"])

    def said() -> str:
        return message(out.next())

    listening, summary = (message(line) for line in out.seen)
    assert listening == f"listening on unix:{sock}"
    assert summary.startswith("serving 2 guest(s), 1 device(s) (1 assigned, 0 hidden)")
    assert summary.rstrip().endswith(f"control socket {tmp_path / 'pciback.ctl'}")
    assert notify.next() == "READY=1"
    assert _ctl_list(tmp_path, capsys)["edu-a"]["owner"] == "alpha"

    # A reassignment: applied as hot-plug.
    config.write_text(_config(sock, owner="beta"))
    backend.send_signal(signal.SIGHUP)
    assert notify.next().startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert said() == f"reloaded {config}: edu-a: alpha -> beta"
    assert notify.next() == "READY=1"
    assert _ctl_list(tmp_path, capsys)["edu-a"]["owner"] == "beta"

    # A config that does not validate: refused, the running one stays.
    config.write_text(_config(sock, owner="gamma"))
    backend.send_signal(signal.SIGHUP)
    assert notify.next().startswith("RELOADING=1")
    assert notify.next() == "READY=1"  # sent after the refusal is in the log (stderr)
    # Every stderr line is JSON too; the refusal is said once, as an error.
    entries = [json.loads(line) for line in backend.log_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    (refused,) = (e for e in entries if "refused" in e["message"])
    assert refused["message"].startswith("reload refused")
    assert (refused["level"], refused["logger"]) == ("ERROR", "pciback")
    assert "device[0].guest: guest 'gamma' is not declared" in refused["message"]
    assert _ctl_list(tmp_path, capsys)["edu-a"]["owner"] == "beta"

    backend.send_signal(signal.SIGTERM)
    assert said() == "SIGTERM received, shutting down"
    assert notify.next() == "STOPPING=1"
    assert backend.wait() == 0
    assert said() == "stopped"
    # Nothing said twice: the refusal was on stderr only, and stderr was all JSON.
    log = backend.log_text().splitlines()
    assert all(json.loads(line) for line in log)
    assert sum("reload refused" in line for line in log) == 1
    assert not sock.exists() and not (tmp_path / "pciback.ctl").exists()


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
