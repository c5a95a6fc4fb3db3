"""ARCHITECTURE rule 1: shared.pci and shared.protocol do no I/O and import no trio."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PURE_PACKAGES = ("shared/pci", "shared/protocol")
FORBIDDEN = {"trio", "socket", "os", "time", "asyncio", "select", "selectors", "subprocess"}

_PROBE = """
import importlib, pkgutil, sys
for package in ("shared.pci", "shared.protocol"):
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        importlib.import_module(f"{package}.{info.name}")
print(" ".join(sorted(name for name in ("trio", "socket") if name in sys.modules)))
"""


def test_importing_the_pure_packages_loads_neither_trio_nor_socket() -> None:
    # A fresh interpreter, so modules other tests imported do not count.
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("package", PURE_PACKAGES)
def test_pure_packages_do_not_import_io_modules(package: str) -> None:
    """``os`` and ``time`` are always in sys.modules, so check the source instead."""
    files = sorted((ROOT / package).glob("*.py"))
    assert files, f"{package} has no modules"
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{path.name}:{node.lineno} imports {n}"
                for n in names
                if n.split(".")[0] in FORBIDDEN
            ]
    assert offenders == []
