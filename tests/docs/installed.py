"""pcisplit as a user gets it: an sdist, a wheel built from it, and a venv with the wheel.

The docs' shell sessions and the packaging tests run the commands of this venv, from
scratch directories outside the repository, so they prove what ``pip install`` gives.

Speed: building the sdist and the wheel takes a few seconds (cffi compiles the ring
module). The venv itself is kept between runs under ``.venv/pcisplit-wheel-test/``
and keyed by ``pyproject.toml``: its third-party dependencies are installed once
(from PyPI through pip's cache), and every run re-installs only the fresh wheel.
CI starts from a clean clone, so there the venv is always new.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Installed", "build_and_install"]


@dataclass(frozen=True)
class Installed:
    """Where the wheel-installed pcisplit lives."""

    venv: Path
    sdist: Path
    wheel: Path

    @property
    def bin_dir(self) -> Path:
        return self.venv / "bin"

    @property
    def python(self) -> Path:
        return self.bin_dir / "python"


def _run(args: list[str], what: str) -> None:
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_and_install(root: Path, dist_dir: Path) -> Installed:
    """Build ``root``'s sdist, then a wheel from that sdist, and install it with ``[testing]``."""
    _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist_dir), str(root)],
        "building the sdist and the wheel (python -m build)",
    )
    sdist = next(dist_dir.glob("pcisplit-*.tar.gz"))
    wheel = next(dist_dir.glob("pcisplit-*.whl"))
    cache = root / ".venv" / "pcisplit-wheel-test"
    key = hashlib.sha256(
        (root / "pyproject.toml").read_bytes() + sys.version.encode()
    ).hexdigest()[:12]
    venv = cache / f"venv-{key}"
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    with _locked(cache / "lock"):
        if not (venv / ".ready").exists():
            for old in cache.glob("venv-*"):
                shutil.rmtree(old, ignore_errors=True)
            _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "creating a venv")
            _run([*pip, f"{wheel}[testing]"], "installing the wheel with its [testing] extra")
            (venv / ".ready").touch()
        else:
            _run([*pip, "--force-reinstall", "--no-deps", str(wheel)], "re-installing the wheel")
    return Installed(venv=venv, sdist=sdist, wheel=wheel)
