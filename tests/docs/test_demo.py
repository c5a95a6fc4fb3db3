"""`make demo` (examples/demo.py) where FUSE cannot be used: it says why and skips the mount.

``fuse_problem`` is asked, as a user other than root, about a device file
that is root's and 0600 as /dev/fuse is; the whole demo runs for real with a
FUSE device that does not exist: everything but the mount step runs, and the
mount step is one line saying why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def _demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pcisplit_demo", ROOT / "examples/demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pcisplit-demo-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def as_nobody(world_dir: Path) -> list[str]:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to run the demo as another user")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import pciback"], cwd=world_dir, capture_output=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot run this checkout's Python: {probe.stderr[-200:]!r}")
    return prefix


def test_fuse_problem_names_a_missing_device(tmp_path: Path) -> None:
    problem = _demo().fuse_problem(str(tmp_path / "fuse"))
    if importlib.util.find_spec("pyfuse3") is None:
        assert problem == "pyfuse3 is not installed (make install installs it)"
    else:
        assert problem is not None and problem.startswith(f"{tmp_path / 'fuse'} is absent")


def test_fuse_problem_names_a_device_this_user_may_not_open(
    world_dir: Path, as_nobody: list[str]
) -> None:
    if importlib.util.find_spec("pyfuse3") is None:
        pytest.skip("pyfuse3 is not installed: that is the problem reported first")
    device = world_dir / "fuse"
    device.write_text("")
    device.chmod(0o600)  # root's, as /dev/fuse is
    demo = str(ROOT / "examples/demo.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('demo', {demo!r})\n"
        "demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo)\n"
        f"print(demo.fuse_problem({str(device)!r}))\n"
    )
    out = subprocess.run(
        [*as_nobody, sys.executable, "-c", code], cwd=world_dir, capture_output=True, text=True,
        timeout=60,
    )
    assert out.stdout == (
        f"{device} (mode 0600) is not readable and writable by uid {NOBODY}; run as root or "
        "as a user allowed to use FUSE\n"
    ), out.stderr


@pytest.mark.slow
def test_the_demo_without_fuse_skips_the_mount_and_finishes(tmp_path: Path) -> None:
    absent = tmp_path / "no-fuse-here"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/demo.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PCISPLIT_DEMO_FUSE_DEVICE": str(absent)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    skipped = [line for line in out.stdout.splitlines() if "skipping the sysfs mount" in line]
    assert len(skipped) == 1, out.stdout
    if shutil.which("lspci") is not None and importlib.util.find_spec("pyfuse3") is not None:
        assert skipped[0] == f"(skipping the sysfs mount: {absent} is absent (load the fuse " \
            "module, or run where FUSE is available))"
    assert "pcifront mount" not in out.stdout  # the step did not start
    assert "3628800" in out.stdout
    assert out.stdout.endswith("demo finished: backend stopped cleanly\n")
    assert list(tmp_path.iterdir()) == []  # the demo's sockets were in its own scratch directory
