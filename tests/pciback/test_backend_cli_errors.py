"""Every expected `pciback` failure is one line on stderr with the documented exit code."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pciback.cli import main
from tests.support.configs import guest_table
from tests.support.tls import TlsFiles

USAGE, FAILURE = 2, 1


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pciback: ")
    assert not captured.out
    return code, lines[0]


def _config(tmp_path: Path, text: str, name: str = "backend.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def busy_tcp_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_port_in_use(capsys: pytest.CaptureFixture[str], busy_tcp_port: int) -> None:
    address = f"tcp://127.0.0.1:{busy_tcp_port}"
    code, line = _fails(capsys, "serve", "--listen", address)
    assert code == FAILURE
    assert f"cannot listen on {address}" in line
    assert "already listens there" in line


def test_unknown_scheme_in_the_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _config(tmp_path, 'listen = ["http://x"]\n')
    code, line = _fails(capsys, "serve", "--config", path)
    assert code == USAGE
    assert line.startswith(f"pciback: {path}: listen[0] 'http://x': unknown transport scheme")


def test_unknown_scheme_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(capsys, "serve", "--listen", "htp://x")
    assert code == USAGE
    assert "--listen htp://x: unknown transport scheme 'htp'" in line


def test_tls_listener_without_a_tls_section(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _config(tmp_path, 'listen = ["tls://127.0.0.1:0"]\n')
    code, line = _fails(capsys, "serve", "--config", path)
    assert code == USAGE
    assert "tls://127.0.0.1:0 needs a [tls] table" in line


def test_socket_path_already_served(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "served.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    try:
        code, line = _fails(capsys, "serve", "--listen", f"unix:{path}")
    finally:
        server.close()
    assert code == FAILURE
    assert f"unix:{path} is already served by another process" in line


def test_socket_directory_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/run/pcisplit/pciback.sock"
    code, line = _fails(capsys, "serve", "--listen", address)
    assert code == FAILURE
    assert f"cannot listen on {address}: No such file or directory" in line
    assert "create it" in line


def test_tls_file_missing_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        'listen = ["tls://127.0.0.1:0"]\n[tls]\ncert = "server.pem"\nkey = "server.key"\n'
        'ca = "ca.pem"\n',
    )
    code, line = _fails(capsys, "serve", "--config", path)
    assert code == USAGE
    assert f"tls.cert: {tmp_path / 'server.pem'}: no such file" in line


def test_tls_key_that_does_not_load(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    (tmp_path / "server.key").write_text("not a key\n")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    path = _config(
        tmp_path,
        'listen = ["tls://127.0.0.1:0"]\n[tls]\ncert = "server.pem"\nkey = "server.key"\n'
        'ca = "ca.pem"\n',
    )
    code, line = _fails(capsys, "serve", "--config", path)
    assert code == USAGE
    assert "tls.key" in line and "cannot load them (" in line and "PEM" in line


def test_config_that_is_not_utf8(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[[guest]]\nname = "gäst"\n'.encode("latin-1"))
    code, line = _fails(capsys, "serve", "--config", str(path))
    assert code == USAGE
    assert line == (
        f"pciback: {path}: not UTF-8 text (byte 19: 0xe4); TOML files must be saved as UTF-8"
    )


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(capsys, "serve", "--config", "nope.toml")
    assert code == USAGE
    assert line == "pciback: cannot read config file nope.toml: No such file or directory"


def test_misspelled_register_gets_the_closest_names_not_all_of_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _config(
        tmp_path,
        '[[device]]\nid = "e"\nmodel = "edu"\nallow = ["pcie.devctrl"]\n',
    )
    code, line = _fails(capsys, "serve", "--config", path)
    assert code == USAGE
    assert "device[0].allow[0]: unknown register 'pcie.devctrl'; did you mean 'pcie.devctl'" in line
    assert len(line) < 300


def test_misspelled_key_gets_the_closest_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _config(tmp_path, '[[device]]\nid = "e"\nmodle = "edu"\n')
    code, line = _fails(capsys, "serve", "--config", path)
    assert code == USAGE
    assert line == "pciback: device[0]: unknown key 'modle'; did you mean 'model'?"


def test_unknown_model_points_at_the_way_to_add_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _config(tmp_path, '[[device]]\nid = "e"\nmodel = "eud"\n')
    code, line = _fails(capsys, "serve", "--config", path)
    assert code == USAGE
    assert "unknown device model 'eud'; did you mean 'edu'?" in line
    assert "register_model" in line


def test_bad_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(capsys, "serve", "--lsten", "unix:x")
    assert code == USAGE
    assert "unrecognized arguments: --lsten" in line


def test_verbose_shows_the_traceback_of_an_expected_failure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "-v", "--config", "nope.toml"]) == USAGE
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == "pciback: cannot read config file nope.toml: No such file or directory"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import pciback

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"pciback {pciback.__version__}\n"


async def test_a_failed_tls_handshake_is_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls_files: TlsFiles
) -> None:
    """The backend's log says why a guest's TLS handshake failed (it used to end in ': ')."""
    caplog.set_level("INFO", logger="pcisplit.backend")
    import ssl

    import trio

    from pciback.testing import running_backend

    config = tls_files.section + guest_table("guest0")
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    tls_files.ca.configure_trust(client_ctx)  # trusts the backend, but has no client certificate
    async with running_backend(config, transports=("tls",), tmp=tmp_path) as rb:
        host, port = rb.address("tls").removeprefix("tls://").rsplit(":", 1)
        stream = trio.SSLStream(
            await trio.open_tcp_stream(host, int(port)), client_ctx, server_hostname=host
        )
        with trio.fail_after(10):
            try:
                await stream.do_handshake()
                await stream.receive_some(1)  # TLS 1.3: the refusal arrives after the handshake
            except trio.BrokenResourceError:
                pass
            while not any("TLS handshake failed" in r.message for r in caplog.records):
                await trio.sleep(0.01)
        await stream.aclose()
    record = next(r for r in caplog.records if "TLS handshake failed" in r.message)
    reason = record.getMessage().split("TLS handshake failed: ", 1)[1]
    assert reason.strip() and "certificate" in reason.lower(), reason
