"""The real `pciback` and `pcifront` processes, talking over a UNIX socket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tool(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"{name}.cli"]


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    sock = tmp_path / "b.sock"
    proc = subprocess.Popen(
        [*_tool("pciback"), "serve", "--listen", f"unix:{sock}", "--listen", "unix:./pciback.sock"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    assert any(f"listening on unix:{sock}" in line for line in lines), lines
    try:
        yield proc, f"unix:{sock}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _pcifront(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_tool("pcifront"), *args], capture_output=True, text=True, timeout=60)


def test_serve_default_prints_both_addresses_and_lspci_lists_edu(
    backend: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    _proc, address = backend
    # Both --listen addresses (./pciback.sock is relative to cwd, tmp_path).
    assert (tmp_path / "pciback.sock").exists()
    out = _pcifront("lspci", "--connect", address, "--guest", "guest0", "-n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
    out = _pcifront("lspci", "--connect", f"unix:{tmp_path / 'pciback.sock'}", "-nn")
    assert out.returncode == 0, out.stderr
    assert "[1234:11e8]" in out.stdout and "[00ff]" in out.stdout


def test_sigterm_shuts_down_cleanly(
    backend: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    proc, _ = backend
    proc.send_signal(signal.SIGTERM)
    out, _err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "SIGTERM received" in out and "stopped" in out
    assert not (tmp_path / "pciback.sock").exists()  # the socket file is removed


def test_sigint_shuts_down_cleanly(backend: tuple[subprocess.Popen[str], str]) -> None:
    proc, _ = backend
    proc.send_signal(signal.SIGINT)
    out, _err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "SIGINT received" in out


@pytest.mark.lspci
@pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils (lspci) is not installed")
def test_real_lspci_decodes_our_dump(
    backend: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    _, address = backend
    out = _pcifront("lspci", "--connect", address, "--guest", "guest0", "-xxx")
    assert out.returncode == 0, out.stderr
    dump = tmp_path / "edu.txt"
    dump.write_text(out.stdout)
    decoded = subprocess.run(
        ["lspci", "-F", str(dump), "-nn", "-vv"], capture_output=True, text=True, check=True
    )
    assert "1234:11e8" in decoded.stdout
    assert "Unclassified device [00ff]" in decoded.stdout
    assert "MSI: Enable- Count=1/1 Maskable- 64bit+" in decoded.stdout


def test_unknown_guest_fails_with_clear_message(backend: tuple[subprocess.Popen[str], str]) -> None:
    _, address = backend
    out = _pcifront("lspci", "--connect", address, "--guest", "nobody")
    assert out.returncode == 1
    assert "UNKNOWN_GUEST" in out.stderr and "nobody" in out.stderr


def test_no_backend_fails_with_clear_message(tmp_path: Path) -> None:
    out = _pcifront("lspci", "--connect", f"unix:{tmp_path / 'absent.sock'}")
    assert out.returncode == 1
    assert "is `pciback serve` running" in out.stderr


def test_invalid_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[[device]]\nid = 'x'\nkind = 'emulated'\n")
    out = subprocess.run(
        [*_tool("pciback"), "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "device[0]: kind 'emulated' needs key 'model'" in out.stderr


def test_edu_driver_example_against_real_backend(
    backend: tuple[subprocess.Popen[str], str],
) -> None:
    _, address = backend
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "edu_driver.py"), "--connect", address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    assert "factorial(10) = 3628800" in out.stdout
    assert "identification 0x010000ed" in out.stdout


def _tls_material(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    guest = ca.issue_cert("guest0")
    guest.cert_chain_pems[0].write_to_path(str(tmp_path / "guest0.pem"))
    guest.private_key_pem.write_to_path(str(tmp_path / "guest0.key"))


def test_lspci_over_shm_and_tls_against_real_backend(tmp_path: Path) -> None:
    _tls_material(tmp_path)
    config = tmp_path / "backend.toml"
    config.write_text(
        f'listen = ["shm:{tmp_path / "shm.sock"}", "tls://127.0.0.1:0"]\n'
        "[tls]\ncert = 'server.pem'\nkey = 'server.key'\nca = 'ca.pem'\n"
        "[[guest]]\nname = 'guest0'\n"
        "[[device]]\nid = 'edu0'\nmodel = 'edu'\nguest = 'guest0'\n"
    )
    proc = subprocess.Popen(
        [*_tool("pciback"), "serve", "--config", str(config)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        addresses = [line.split("listening on ", 1)[1].strip() for line in lines]
        shm = next(a for a in addresses if a.startswith("shm:"))
        tls = next(a for a in addresses if a.startswith("tls://"))
        out = _pcifront("lspci", "--connect", shm, "--guest", "guest0", "-n")
        assert out.returncode == 0, out.stderr
        assert out.stdout == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
        out = _pcifront(
            "lspci", "--connect", tls, "--guest", "guest0", "-n",
            "--cert", str(tmp_path / "guest0.pem"), "--key", str(tmp_path / "guest0.key"),
            "--ca", str(tmp_path / "ca.pem"),
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
        # Without a client certificate the TLS handshake is refused.
        out = _pcifront("lspci", "--connect", tls, "--ca", str(tmp_path / "ca.pem"))
        assert out.returncode == 1
        assert out.stderr.startswith("pcifront: ") and "Traceback" not in out.stderr, out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
