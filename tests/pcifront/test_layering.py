"""pcifront's layers point one way: core <- client <- tools <- the public modules.

Read from the source with ``ast``, counting every import (also those under
``if TYPE_CHECKING:`` and inside functions): a cycle hidden from the
interpreter is still one for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pcifront"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, with ``from x import y`` also as ``x.y``."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports_of(path.read_text(), package)


def _imports_of(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# What each layer must never import (prefixes). The core is sans-I/O: no trio, no
# transports, no clock; the clients never reach up into the tools.
FORBIDDEN = {
    "pcifront.core": (
        "trio", "socket", "time", "shared.transport", "pcifront.client", "pcifront.tools",
        "pcifront.cli", "pcifront.blocking",
    ),
    "pcifront.client": ("pcifront.tools", "pcifront.cli", "pcifront.blocking"),
    "pcifront.tools": ("pcifront.cli", "pcifront.blocking"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    wrong = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name == layer or name.startswith(layer + ".")
        for target in sorted(_imports(path))
        if any(target == bad or target.startswith(bad + ".") for bad in FORBIDDEN[layer])
    ]
    assert not wrong, "\n".join(wrong)


def test_pcifront_has_no_import_cycle() -> None:
    # Module-level graph; an import of a package means its __init__, which only
    # re-exports, so package __init__ modules are left out of the search.
    def resolve(name: str) -> str | None:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    graph = {
        name: {
            dep
            for target in _imports(path)
            if (dep := resolve(target)) is not None
            and dep != name
            and MODULES[dep].name != "__init__.py"
        }
        for name, path in MODULES.items()
        if path.name != "__init__.py"
    }
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycles.append([*trail[trail.index(name):], name])
            return
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_rule_sees_hidden_imports() -> None:
    # The checker itself: imports under TYPE_CHECKING, inside functions and relative
    # ones count.
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pcifront.client.bus import Bus\n"
        "def f():\n    import trio\n"
        "from ..tools import lspci\n"
    )
    found = _imports_of(source, "pcifront.core")
    assert {"pcifront.client.bus.Bus", "trio", "pcifront.tools.lspci"} <= found
