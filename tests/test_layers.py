"""The layers point one way: no import cycle, and no import against the layer order.

Read from the source with ``ast``, counting every import: module-level ones,
those under ``if TYPE_CHECKING:`` and those inside functions. An import the
interpreter never runs is still an arrow for the reader, so a cycle hidden
behind ``TYPE_CHECKING`` or a function-level import is still a cycle.

The rules, from the bottom up:

* ``shared`` (protocol, transports, PCI helpers) is the foundation of both
  sides: it imports neither ``pciback`` nor ``pcifront``.
* ``pcifront`` (the guest agent) imports ``shared`` and never ``pciback``.
* ``pciback`` (the backend) is layered, each layer importing only layers
  below it (and ``shared``)::

      _ratelog          the one rule for rate-limited, counted log lines
      devices           device models (emulated, snapshot, host)
      policy            what a guest may read and write of a device
      config            the configuration's schema and parsing
      plane             the device plane: registry, access, DMA, interrupts, hot-plug
      guests | ops      the guest side (front doors) and operations (ctl, reload):
                        siblings, neither imports the other
      service           the composition root: builds and runs everything
      cli               the ``pciback`` command
      testing           helpers for tests (may import ``pcifront`` too)

  The package's own ``__init__`` re-exports the public API and sits with
  ``cli``. Modules of one layer may import each other (without cycles).
* No module of ``pciback``, ``pcifront`` or ``shared`` is part of an import
  cycle.

Each failure names the importing file, its line and the import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "pcifront", "pciback")

#: pciback's layers, bottom first; a module may import its own layer and those below.
PCIBACK_LAYERS: tuple[tuple[str, ...], ...] = (
    ("pciback._ratelog",),
    ("pciback.devices",),
    ("pciback.policy",),
    ("pciback.config",),
    ("pciback.plane",),
    ("pciback.guests", "pciback.ops"),
    ("pciback.service",),
    ("pciback.cli", "pciback"),
    ("pciback.testing",),
)


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is, and how it was written."""

    module: str  # the importing module
    path: Path
    line: int
    target: str  # the module (or module.name) imported, absolute
    text: str  # the statement as written, for the failure message

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {
    module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
}


def imports_of(source: str, module: str, path: Path) -> list[Import]:
    """Every import in ``source`` (anywhere in the tree), as absolute module names.

    ``from x import y`` imports module ``x.y`` when there is one, else ``x``.
    """
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, path, node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            text = f"from {'.' * node.level}{node.module or ''} import " + ", ".join(
                alias.name for alias in node.names
            )
            targets = {
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            }
            found += [Import(module, path, node.lineno, t, text) for t in sorted(targets)]
    return found


def our_imports() -> list[Import]:
    """Every import of one of our modules by another (compiled cffi modules are not ours)."""
    return [
        imp
        for module, path in MODULES.items()
        for imp in imports_of(path.read_text(), module, path)
        if imp.target in MODULES and imp.target != module
    ]


EDGES = our_imports()


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer in :data:`PCIBACK_LAYERS` (None outside pciback)."""
    best: tuple[int, int] | None = None  # (length of the matching prefix, layer)
    for index, layer in enumerate(PCIBACK_LAYERS):
        for prefix in layer:
            matches = module == prefix or (
                prefix != "pciback" and module.startswith(prefix + ".")
            )
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def group_of(module: str) -> str:
    """The layer entry ``module`` belongs to (``pciback.guests``, ``pciback.ops``...)."""
    for layer in PCIBACK_LAYERS:
        for prefix in layer:
            if prefix != "pciback" and (module == prefix or module.startswith(prefix + ".")):
                return prefix
    return module


def test_every_pciback_module_has_a_layer() -> None:
    lost = [name for name in MODULES if name.startswith("pciback") and layer_of(name) is None]
    assert not lost, f"modules in no layer of PCIBACK_LAYERS (add them to one): {lost}"


def test_shared_imports_neither_side() -> None:
    wrong = [
        imp.where()
        for imp in EDGES
        if imp.module.split(".")[0] == "shared" and imp.target.split(".")[0] != "shared"
    ]
    assert not wrong, "shared must import neither pciback nor pcifront:\n" + "\n".join(wrong)


def test_pcifront_imports_no_pciback() -> None:
    wrong = [
        imp.where()
        for imp in EDGES
        if imp.module.split(".")[0] == "pcifront" and imp.target.split(".")[0] == "pciback"
    ]
    assert not wrong, "pcifront (the guest) must not import pciback:\n" + "\n".join(wrong)


def wrong_arrows(edges: list[Import]) -> list[str]:
    """The imports among pciback's modules that go up a layer or across to a sibling."""
    wrong = []
    for imp in edges:
        if imp.module.split(".")[0] != "pciback" or imp.target.split(".")[0] != "pciback":
            continue
        low, high = layer_of(imp.target), layer_of(imp.module)
        if low is None or high is None:
            continue  # test_every_pciback_module_has_a_layer says so
        if low > high:
            wrong.append(
                f"{imp.where()}  ({group_of(imp.module)} must not import "
                f"{group_of(imp.target)}, a layer above it)"
            )
        elif low == high and group_of(imp.module) != group_of(imp.target):
            wrong.append(
                f"{imp.where()}  ({group_of(imp.module)} and {group_of(imp.target)} are "
                "siblings: neither imports the other)"
            )
    return wrong


def test_pciback_imports_point_down_the_layers() -> None:
    wrong = wrong_arrows(EDGES)
    assert not wrong, "imports against pciback's layer order:\n" + "\n".join(wrong)


def find_cycles(edges: list[Import]) -> list[list[Import]]:
    """Each import cycle once, as the imports that make it up."""
    graph: dict[str, list[Import]] = {}
    for imp in edges:
        graph.setdefault(imp.module, []).append(imp)
    cycles: list[list[Import]] = []
    seen_sets: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(name: str, trail: list[Import], on_trail: list[str]) -> None:
        if name in on_trail:
            cycle = trail[on_trail.index(name):]
            key = frozenset(imp.module for imp in cycle)
            if key not in seen_sets:
                seen_sets.add(key)
                cycles.append(cycle)
            return
        if name in done:
            return
        for imp in graph.get(name, []):
            visit(imp.target, [*trail, imp], [*on_trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [], [])
    return cycles


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package: str) -> None:
    cycles = [
        cycle
        for cycle in find_cycles(EDGES)
        if any(imp.module.split(".")[0] == package for imp in cycle)
    ]
    assert not cycles, f"import cycles through {package}:\n" + "\n\n".join(
        "\n".join(imp.where() for imp in cycle) for cycle in cycles
    )


# ----------------------------------------------------------------------------- the checker


def _edges_of(source: str, module: str, path: Path) -> list[str]:
    return sorted({imp.target for imp in imports_of(source, module, path)})


def test_the_checker_sees_hidden_and_relative_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pciback.service import Backend\n"
        "def f():\n    import pciback.ops.lifecycle\n"
        "from ..plane import registry\n"
    )
    path = ROOT / "pciback" / "guests" / "session.py"
    found = _edges_of(source, "pciback.guests.session", path)
    assert "pciback.service" in found
    assert "pciback.ops.lifecycle" in found
    assert "pciback.plane.registry" in found


def test_the_checker_finds_a_cycle_and_wrong_arrows() -> None:
    path = ROOT / "pciback" / "plane" / "hotplug.py"
    up = Import("pciback.plane.hotplug", path, 3, "pciback.guests.dispatch", "from x import y")
    down = Import("pciback.guests.dispatch", path, 7, "pciback.plane.hotplug", "from y import x")
    (cycle,) = find_cycles([up, down])
    assert {imp.module for imp in cycle} == {"pciback.plane.hotplug", "pciback.guests.dispatch"}
    across = Import("pciback.ops.lifecycle", path, 9, "pciback.guests.session", "import z")
    (wrong_up, wrong_across) = wrong_arrows([up, down, across])
    assert "pciback/plane/hotplug.py:3: from x import y" in wrong_up
    assert "pciback.plane must not import pciback.guests" in wrong_up
    assert "siblings" in wrong_across
    assert layer_of("pciback") == layer_of("pciback.cli")
