"""Every expected `pcifront` failure is one line on stderr with the documented exit code."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from pcifront.cli import main
from tests.support.serve import ServeFactory

USAGE, FAILURE = 2, 1
BIN = Path(sys.executable).parent


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pcifront: ")
    assert not captured.out
    return code, lines[0]


@pytest.fixture
def tcp_peer() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A TCP server on loopback that is not pcisplit: ``serve(handle)`` returns its address."""
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def serve(handle: Callable[[socket.socket], None]) -> str:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        sockets.append(server)

        def run() -> None:
            conn, _ = server.accept()
            with conn:
                handle(conn)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return f"127.0.0.1:{server.getsockname()[1]}"

    yield serve
    for server in sockets:
        server.close()
    for thread in threads:
        thread.join(10)


def test_no_backend_at_a_unix_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/none.sock"
    code, line = _fails(capsys, "lspci", "--connect", address)
    assert code == FAILURE
    assert line.startswith(f"pcifront: cannot connect to {address}: No such file or directory")
    assert "pciback serve" in line


def test_a_plain_tcp_peer_that_is_not_pcisplit_gets_no_certificate_hint(
    capsys: pytest.CaptureFixture[str], tcp_peer: Callable[..., str]
) -> None:
    address = tcp_peer(lambda conn: conn.recv(100))  # reads our Hello, then hangs up
    code, line = _fails(capsys, "lspci", "--connect", f"tcp://{address}")
    assert code == FAILURE
    assert "closed the connection during the handshake" in line
    assert "certificate" not in line and "is the address a pcisplit backend?" in line


def test_timeout_applies_to_the_handshake(
    capsys: pytest.CaptureFixture[str], tcp_peer: Callable[..., str]
) -> None:
    done = threading.Event()
    address = tcp_peer(lambda conn: done.wait(30))  # accepts, never answers
    try:
        # 1 s, not less: on a loaded machine the TCP connect itself can take a few
        # hundred ms, and the time-out of that stage has its own message.
        code, line = _fails(capsys, "--timeout", "1", "lspci", "--connect", f"tcp://{address}")
    finally:
        done.set()
    assert code == FAILURE
    assert line == "pcifront: the backend did not answer the handshake within 1.0 s"


def test_tls_failure_says_why(
    capsys: pytest.CaptureFixture[str], tcp_peer: Callable[..., str], tmp_path: Path
) -> None:
    server_ca, other_ca = trustme.CA(), trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    other_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    def handle(conn: socket.socket) -> None:
        try:
            server_ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            pass  # the client rejects our certificate: that is the point

    address = tcp_peer(handle)
    code, line = _fails(
        capsys, "lspci", "--connect", f"tls://{address}", "--ca", str(tmp_path / "ca.pem")
    )
    assert code == FAILURE
    assert line.startswith(f"pcifront: cannot connect to tls://{address}: TLS: ")
    assert "certificate verify failed" in line


def test_cert_without_its_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trustme.CA().issue_cert("guest0").cert_chain_pems[0].write_to_path(str(tmp_path / "g.pem"))
    code, line = _fails(
        capsys, "lspci", "--connect", "tls://127.0.0.1:1", "--cert", str(tmp_path / "g.pem")
    )
    assert code == USAGE
    assert f"--cert {tmp_path / 'g.pem'}: cannot load the certificate and its key" in line
    assert "without --key the key must be in the --cert file" in line


def test_key_without_cert(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(capsys, "lspci", "--connect", "tls://127.0.0.1:1", "--key", "g.key")
    assert (code, line) == (
        USAGE,
        "pcifront: --key needs --cert (the certificate the key belongs to)",
    )


def test_missing_tls_file_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(capsys, "lspci", "--connect", "tls://127.0.0.1:1", "--ca", "nope.pem")
    assert (code, line) == (USAGE, "pcifront: --ca nope.pem: no such file")


def test_tls_files_with_a_plain_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(capsys, "lspci", "--connect", "unix:./x.sock", "--cert", "g.pem")
    assert (code, line) == (
        USAGE,
        "pcifront: --cert is only used with tls:// addresses, not unix:./x.sock",
    )


def test_bad_selector_is_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(capsys, "lspci", "--connect", "unix:./x.sock", "-s", "zz:zz:zz")
    assert code == USAGE
    assert "-s 'zz:zz:zz'" in line


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_bad_timeout_is_usage(capsys: pytest.CaptureFixture[str], value: str) -> None:
    code, line = _fails(capsys, "--timeout", value, "lspci", "--connect", "unix:./x.sock")
    assert code == USAGE
    assert "--timeout" in line


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import pcifront

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"pcifront {pcifront.__version__}\n"


@pytest.mark.slow
def test_a_refusal_by_the_backend_is_one_line_and_exit_1(
    tmp_path: Path, serve_pciback: ServeFactory
) -> None:
    """The real commands: the backend refuses a guest it does not know."""
    sock = tmp_path / "b.sock"
    serve_pciback("--listen", f"unix:{sock}")
    out = subprocess.run(
        [str(BIN / "pcifront"), "lspci", "--connect", f"unix:{sock}", "--guest", "nobody"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == FAILURE
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcifront: backend refused the connection")
    assert "nobody" in lines[0]
