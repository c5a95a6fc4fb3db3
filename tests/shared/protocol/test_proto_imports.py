"""shared.protocol is sans-I/O: it imports no trio, socket, os or time."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = {"trio", "socket", "os", "time", "asyncio", "select", "selectors", "subprocess"}


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (not only at the top)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.add("<dynamic __import__>")
    return names


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_protocol_sources_import_nothing_forbidden_even_indirectly() -> None:
    # Walk every first-party module shared.protocol reaches (shared.errors, ...).
    todo = [p for p in (ROOT / "shared" / "protocol").glob("*.py")]
    seen: set[Path] = set()
    offenders: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN or name.startswith("<"):
                offenders.setdefault(str(path.relative_to(ROOT)), set()).add(name)
            if top == "shared":
                parts = name.split(".")
                # the module itself and every parent package run on import
                for i in range(1, len(parts) + 1):
                    target = _module_file(".".join(parts[:i]))
                    if target is not None:
                        todo.append(target)
    assert len(seen) >= 6  # the five protocol modules and shared.errors at least
    assert offenders == {}


def test_importing_shared_protocol_loads_no_trio_or_socket() -> None:
    # os and time are loaded by the interpreter itself at start-up, so the
    # source check above covers them; trio and socket must stay unloaded.
    code = (
        "import json, sys\n"
        "import shared.protocol\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('trio', 'socket', '_socket', 'asyncio', 'selectors'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []
