"""The TLS recipe in docs/operations.md ("Making the TLS certificates") works end to end.

The docs runner already runs the page's openssl session and ``pciback check``;
here the same commands, taken from the page, make the files, a backend serves
the page's ``tls.toml`` (on a free port instead of the page's fixed one) and the
page's ``pcifront`` command, run as written, lists the guest's device over TLS.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PAGE = ROOT / "docs" / "operations.md"
PAGE_PORT = "tls://127.0.0.1:7071"
TIMEOUT = 60.0  # a stall guard for real processes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


def _section() -> str:
    text = PAGE.read_text()
    start = text.index("### Making the TLS certificates")
    end = text.index("\n## ", start)
    return text[start:end]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, re.M | re.S)


def test_the_recipe_makes_certificates_a_guest_connects_with(tmp_path: Path) -> None:
    section = _section()
    session = _blocks(section, "console")[0]
    commands = [line[2:] for line in session.splitlines() if line.startswith("$ ")]
    assert any(c.startswith("openssl req -x509") for c in commands)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    outputs = [
        subprocess.run(["bash", "-c", c], cwd=tmp_path, env=env, capture_output=True, text=True,
                       check=True, timeout=TIMEOUT).stdout
        for c in commands
    ]
    assert outputs[-1] == "server.pem: OK\ndb.pem: OK\n"

    config = _blocks(section, "toml")[0]
    assert PAGE_PORT in config
    (tmp_path / "tls.toml").write_text(config.replace(PAGE_PORT, "tls://127.0.0.1:0"))
    (command,) = _blocks(section, "sh")[0].splitlines()
    backend = subprocess.Popen(
        [str(BIN / "pciback"), "serve", "--config", "tls.toml"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert backend.stdout is not None
        first = backend.stdout.readline()
        assert first.startswith("pciback: listening on tls://127.0.0.1:"), first
        address = first.split("listening on ", 1)[1].strip()
        out = subprocess.run(
            ["bash", "-c", command.replace(PAGE_PORT, address) + " -nn"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "00:00.0 Unclassified device [00ff]: Device [1234:11e8] (rev 10)\n"
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.communicate(timeout=TIMEOUT)
