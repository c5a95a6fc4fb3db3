"""The real `pciback` and `pcifront` processes, talking over a UNIX socket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.configs import ONE_GUEST, listen_line
from tests.support.serve import ServeFactory, ServeProcess, pciback_command
from tests.support.tls import TlsFiles

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tool(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"{name}.cli"]


@pytest.fixture
def backend(serve_pciback: ServeFactory, tmp_path: Path) -> ServeProcess:
    """The embedded default config on ``unix:tmp_path/b.sock`` and ``unix:./pciback.sock``."""
    sock = tmp_path / "b.sock"
    backend = serve_pciback("--listen", f"unix:{sock}", "--listen", "unix:./pciback.sock")
    assert f"unix:{sock}" in backend.addresses, backend.addresses
    return backend


def _pcifront(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_tool("pcifront"), *args], capture_output=True, text=True, timeout=60)


def test_serve_default_prints_both_addresses_and_lspci_lists_edu(
    backend: ServeProcess, tmp_path: Path
) -> None:
    address = f"unix:{tmp_path / 'b.sock'}"
    # Both --listen addresses (./pciback.sock is relative to cwd, tmp_path).
    assert (tmp_path / "pciback.sock").exists()
    out = _pcifront("lspci", "--connect", address, "--guest", "guest0", "-n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
    out = _pcifront("lspci", "--connect", f"unix:{tmp_path / 'pciback.sock'}", "-nn")
    assert out.returncode == 0, out.stderr
    assert "[1234:11e8]" in out.stdout and "[00ff]" in out.stdout


def test_sigterm_shuts_down_cleanly(
    backend: ServeProcess, tmp_path: Path
) -> None:
    assert backend.stop(signal.SIGTERM) == 0
    out = backend.out.text
    assert "SIGTERM received" in out and "stopped" in out
    assert not (tmp_path / "pciback.sock").exists()  # the socket file is removed


def test_sigint_shuts_down_cleanly(backend: ServeProcess) -> None:
    assert backend.stop(signal.SIGINT) == 0
    assert "SIGINT received" in backend.out.text


@pytest.mark.lspci
@pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils (lspci) is not installed")
def test_real_lspci_decodes_our_dump(
    backend: ServeProcess, tmp_path: Path
) -> None:
    out = _pcifront("lspci", "--connect", backend.address("unix"), "--guest", "guest0", "-xxx")
    assert out.returncode == 0, out.stderr
    dump = tmp_path / "edu.txt"
    dump.write_text(out.stdout)
    decoded = subprocess.run(
        ["lspci", "-F", str(dump), "-nn", "-vv"], capture_output=True, text=True, check=True
    )
    assert "1234:11e8" in decoded.stdout
    assert "Unclassified device [00ff]" in decoded.stdout
    assert "MSI: Enable- Count=1/1 Maskable- 64bit+" in decoded.stdout


def test_unknown_guest_fails_with_clear_message(backend: ServeProcess) -> None:
    out = _pcifront("lspci", "--connect", backend.address("unix"), "--guest", "nobody")
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
        [*pciback_command(), "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "device[0]: kind 'emulated' needs key 'model'" in out.stderr


def test_edu_driver_example_against_real_backend(
    backend: ServeProcess,
) -> None:
    address = backend.address("unix")
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


def test_lspci_over_shm_and_tls_against_real_backend(
    tmp_path: Path, tls_files: TlsFiles, serve_pciback: ServeFactory
) -> None:
    cert, key = tls_files.client_files("guest0")
    backend = serve_pciback(
        config=listen_line(f"shm:{tmp_path / 'shm.sock'}", "tls://127.0.0.1:0")
        + tls_files.section
        + ONE_GUEST
    )
    shm, tls = backend.address("shm"), backend.address("tls")
    out = _pcifront("lspci", "--connect", shm, "--guest", "guest0", "-n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
    out = _pcifront(
        "lspci", "--connect", tls, "--guest", "guest0", "-n",
        "--cert", str(cert), "--key", str(key), "--ca", str(tmp_path / "ca.pem"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
    # Without a client certificate the TLS handshake is refused.
    out = _pcifront("lspci", "--connect", tls, "--ca", str(tmp_path / "ca.pem"))
    assert out.returncode == 1
    assert out.stderr.startswith("pcifront: ") and "Traceback" not in out.stderr, out.stderr
    assert backend.stop() == 0
