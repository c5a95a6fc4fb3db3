"""`pciback check` and `pciback serve` agree: where they listen, whom they can serve.

- a config without ``listen`` listens where the embedded default does, for both;
- ``--listen`` replaces the config's addresses, for both, and the control socket
  follows the first ``unix:`` listener actually used (``--control`` moves it);
- a second backend in the same directory is told that its *control* socket is
  taken and how to move it;
- ``check`` warns about listeners no guest can use and guests no listener admits.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pciback.cli import main
from pciback.config import parse_config
from pciback.guests.identity import unreachable

PCIBACK = Path(sys.executable).parent / "pciback"
USAGE, FAILURE = 2, 1
TIMEOUT = 30.0  # a stall guard for a real process

GUEST = '[[guest]]\nname = "guest0"\n'
EDU = '[[device]]\nid = "edu0"\nmodel = "edu"\nguest = "guest0"\n'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _write(tmp_path: Path, text: str, name: str = "backend.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _token(tmp_path: Path, name: str = "g.token") -> str:
    path = tmp_path / name
    path.write_text("0123456789abcdef0123\n")
    path.chmod(0o600)
    return name


class Served:
    """A real `pciback serve` in ``cwd``: its startup lines, then SIGTERM."""

    def __init__(self, cwd: Path, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [str(PCIBACK), "serve", *argv],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("pciback: serving "):
                break
        assert self.lines and self.lines[-1].startswith("pciback: serving"), self.finish()

    def finish(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return out, err


@pytest.fixture
def served() -> Iterator[list[Served]]:
    running: list[Served] = []
    yield running
    for backend in running:
        if backend.proc.poll() is None:
            backend.proc.kill()
            backend.proc.wait()


# ----------------------------------------------------------------- no listen key


def test_a_config_without_listen_listens_where_the_default_does_for_check_and_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: list[Served]
) -> None:
    config = _write(tmp_path, GUEST + EDU)
    assert main(["check", "--config", str(config)]) == 0
    assert capsys.readouterr().out.endswith("listening on unix:./pciback.sock\n")
    served.append(backend := Served(tmp_path, "--config", str(config)))
    assert backend.lines[0] == "pciback: listening on unix:./pciback.sock\n"
    assert (tmp_path / "pciback.sock").is_socket()
    assert backend.finish()[0].endswith("pciback: stopped\n")


def test_an_empty_listen_list_means_the_same_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, "listen = []\n" + GUEST + EDU)
    assert main(["check", "--config", str(config)]) == 0
    assert capsys.readouterr().out.endswith("listening on unix:./pciback.sock\n")


# ----------------------------------------------------------------- --listen replaces


def test_listen_replaces_the_configured_addresses_in_check_and_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: list[Served]
) -> None:
    config = _write(tmp_path, 'listen = ["unix:./configured.sock"]\n' + GUEST + EDU)
    argv = ["--config", str(config), "--listen", "unix:./a.sock", "--listen", "unix:./b.sock"]
    assert main(["check", *argv]) == 0
    assert capsys.readouterr().out.endswith("listening on unix:./a.sock, unix:./b.sock\n")
    served.append(backend := Served(tmp_path, *argv))
    assert backend.lines[:2] == [
        "pciback: listening on unix:./a.sock\n",
        "pciback: listening on unix:./b.sock\n",
    ]
    assert not (tmp_path / "configured.sock").exists()
    assert (tmp_path / "a.sock").is_socket() and (tmp_path / "b.sock").is_socket()


def test_listen_replaces_the_embedded_default_and_the_control_socket_follows(
    tmp_path: Path, served: list[Served]
) -> None:
    (tmp_path / "run").mkdir()
    served.append(backend := Served(tmp_path, "--listen", "unix:./run/b.sock"))
    assert backend.lines[0] == "pciback: listening on unix:./run/b.sock\n"
    assert backend.lines[1].rstrip().endswith("control socket run/pciback.ctl")
    assert not (tmp_path / "pciback.sock").exists()
    assert (tmp_path / "run/pciback.ctl").is_socket()


def test_check_refuses_a_bad_listen_option_like_serve(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = _write(tmp_path, GUEST)
    for command in ("check", "serve"):
        assert main([command, "--config", str(config), "--listen", "htp://x"]) == USAGE
        err = capsys.readouterr().err
        assert err.startswith("pciback: --listen htp://x: unknown transport scheme 'htp'")
        assert err.count("\n") == 1


def test_a_tls_listen_option_without_a_ca_is_refused_by_check_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = _write(tmp_path, GUEST)
    assert main(["check", "--config", str(config), "--listen", "tls://127.0.0.1:0"]) == USAGE
    assert "tls://127.0.0.1:0 needs a [tls] table" in capsys.readouterr().err


# ----------------------------------------------------------------- second backend


def test_a_second_backend_in_the_same_directory_is_told_about_the_control_socket(
    tmp_path: Path, served: list[Served]
) -> None:
    served.append(Served(tmp_path))
    second = subprocess.run(
        [str(PCIBACK), "serve", "--listen", "unix:./second.sock"],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert second.returncode == FAILURE
    lines = second.stderr.splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(
        "pciback: cannot open the control socket pciback.ctl (the one `pciback ctl` talks to)"
    )
    assert "unix:pciback.ctl is already served by another process" in lines[0]
    assert 'control = "PATH"' in lines[0] and "--control PATH" in lines[0]


def test_control_moves_the_second_backends_control_socket(
    tmp_path: Path, served: list[Served]
) -> None:
    served.append(Served(tmp_path))
    served.append(
        second := Served(tmp_path, "--listen", "unix:./second.sock", "--control", "second.ctl")
    )
    assert second.lines[-1].rstrip().endswith("control socket second.ctl")
    assert (tmp_path / "second.ctl").is_socket() and (tmp_path / "pciback.ctl").is_socket()


# ----------------------------------------------------------------- reachability


def test_check_warns_about_a_tcp_listener_no_guest_can_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(
        tmp_path, 'listen = ["tcp://127.0.0.1:7070"]\n' + GUEST + "allow_plain_tcp = true\n"
    )
    assert main(["check", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "is valid" in captured.out
    assert captured.err.splitlines() == [
        "pciback: warning: listen tcp://127.0.0.1:7070: no guest can connect there: every guest "
        "will be refused (over tcp:// a guest needs allow_plain_tcp = true and "
        'token_file = "PATH" in its [[guest]] table)',
        "pciback: warning: guest 'guest0' cannot connect on any listener: "
        'tcp://127.0.0.1:7070 (add token_file = "PATH")',
    ]


def test_check_is_silent_when_every_guest_and_listener_can_meet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = _token(tmp_path)
    config = _write(
        tmp_path,
        'listen = ["tcp://127.0.0.1:7070", "unix:./b.sock"]\n'
        + GUEST + f'allow_plain_tcp = true\ntoken_file = "{token}"\n'
        + '[[guest]]\nname = "local"\n',
    )
    assert main(["check", "--config", str(config)]) == 0
    assert capsys.readouterr().err == ""


def test_unreachable_follows_the_identity_rules(tmp_path: Path) -> None:
    token = _token(tmp_path)
    guests = parse_config(
        '[[guest]]\nname = "plain"\nallow_plain_tcp = true\n'
        f'[[guest]]\nname = "tokened"\ntoken_file = "{token}"\n'
        '[[guest]]\nname = "bare"\n',
        base=tmp_path,
    ).guests
    # vsock:// needs a token only: "tokened" can use it, the others cannot.
    assert unreachable(["vsock://3:7070"], guests) == [
        "guest 'plain' cannot connect on any listener: vsock://3:7070 (add token_file = \"PATH\")",
        "guest 'bare' cannot connect on any listener: vsock://3:7070 (add token_file = \"PATH\")",
    ]
    # tcp:// needs both: nobody has both.
    warnings = unreachable(["tcp://127.0.0.1:1"], guests)
    assert warnings[0].startswith("listen tcp://127.0.0.1:1: no guest can connect there")
    assert len(warnings) == 4
    # With a unix: listener every guest has a way in; only a useless allow_plain_tcp is named.
    assert unreachable(["unix:/x.sock", "tcp://127.0.0.1:1"], guests) == [
        "listen tcp://127.0.0.1:1: no guest can connect there: every guest will be refused "
        '(over tcp:// a guest needs allow_plain_tcp = true and token_file = "PATH" in its '
        "[[guest]] table)",
        "guest 'plain' sets allow_plain_tcp = true but has no token_file, so it will be refused "
        'on tcp://127.0.0.1:1; add token_file = "PATH"',
    ]
    assert unreachable(["unix:/x.sock", "tls://0.0.0.0:1", "shm:/y"], guests) == []
