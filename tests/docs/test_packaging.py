"""The sdist and the wheel are what a user gets: built, installed in a fresh venv, used.

The venv is the session fixture ``pcisplit_installed`` (tests/docs/installed.py): the
wheel is built from the sdist, so the sdist is complete too. Everything here runs
from a scratch directory outside the repository.
"""

from __future__ import annotations

import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.docs.installed import Installed
from tests.support.serve import ServeProcess

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(installed: Installed, cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [str(installed.bin_dir / args[0]), *args[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_sdist_has_what_a_build_needs(pcisplit_installed: Installed) -> None:
    with tarfile.open(pcisplit_installed.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "shared/ring/ring.h",
                   "shared/ring/_build.py", "pciback/default.toml", "pciback/testing/plugin.py"):
        assert needed in names, needed


def test_the_wheel_has_the_license_the_plugin_and_the_compiled_ring(
    pcisplit_installed: Installed,
) -> None:
    with zipfile.ZipFile(pcisplit_installed.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert f"{dist_info}/licenses/LICENSE" in names
    assert any(n.startswith("shared/ring/_ring_cffi") and n.endswith(".so") for n in names)
    assert {"pciback/py.typed", "pcifront/py.typed", "shared/py.typed"} <= names
    assert "pcisplit = pciback.testing.plugin" in entry_points
    assert "pciback = pciback.cli:main" in entry_points
    assert "Provides-Extra: testing" in metadata


def test_installed_commands_serve_edu_and_read_it_back(
    pcisplit_installed: Installed, tmp_path: Path
) -> None:
    probe = "import pciback, pcifront; print(pciback.__file__); print(pcifront.__version__)"
    where, version = _run(pcisplit_installed, tmp_path, "python", "-c", probe).splitlines()
    assert Path(where).is_relative_to(pcisplit_installed.venv), "not the installed copy"
    assert version == pcisplit_installed.wheel.name.split("-")[1]
    assert _run(pcisplit_installed, tmp_path, "pciback", "--version") == f"pciback {version}\n"
    assert _run(pcisplit_installed, tmp_path, "pcifront", "--version") == f"pcifront {version}\n"

    with ServeProcess(tmp_path, command=[str(pcisplit_installed.bin_dir / "pciback")]) as backend:
        assert backend.out.seen[0] == "pciback: listening on unix:./pciback.sock"
        listing = _run(pcisplit_installed, tmp_path, "pcifront", "lspci", "--connect",
                       "unix:./pciback.sock", "-n")
        assert listing == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
        script = (
            "import trio, pcifront\n"
            "async def main():\n"
            "    async with pcifront.connect('unix:./pciback.sock') as bus:\n"
            "        edu = bus.devices[0]\n"
            "        await edu.bar_write(0, 0x04, 4, 0x12345678)\n"
            "        print(hex(await edu.bar_read(0, 0x04, 4)))\n"
            "trio.run(main)\n"
        )
        assert _run(pcisplit_installed, tmp_path, "python", "-c", script) == "0xedcba987\n"
        assert backend.stop() == 0
