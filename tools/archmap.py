"""The map of pcisplit's layers, read from the code: the one place the layer order is written.

``LAYERS`` names every package's layers, bottom first. A module may import
modules of its own layer group and of the layers below; groups that share a
layer are siblings and never import each other. The import graph is read
from the source with :mod:`ast`, counting every import: module-level ones,
those under ``if TYPE_CHECKING:`` and those inside functions (an import the
interpreter never runs is still an arrow a reader has to follow).

``tests/test_layers.py`` holds the code to these rules, and
``docs/architecture.md`` embeds :func:`render_diagram`'s output, which
``tests/test_layers.py`` keeps current. Regenerate it with::

    python tools/archmap.py --write

This is a development tool: it reads the repository, and is not installed.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "pcifront", "pciback")

#: Each package's layers, bottom first. Every entry is a module prefix (a group);
#: entries in one tuple are siblings. A package's own ``__init__`` sits on top.
LAYERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "shared": (
        ("shared.errors",),
        ("shared.sync",),
        (
            "shared.pci",
            "shared.protocol",
            "shared.ring",
            "shared.evtchn",
            "shared.cli",
        ),
        ("shared.transport",),
        ("shared",),
    ),
    "pcifront": (
        ("pcifront.core",),
        ("pcifront.client",),
        ("pcifront.tools",),
        ("pcifront.blocking", "pcifront._mount"),
        ("pcifront",),
        ("pcifront.cli",),
    ),
    "pciback": (
        ("pciback._ratelog",),
        ("pciback.devices",),
        ("pciback.policy",),
        ("pciback.config",),
        ("pciback.plane",),
        ("pciback.guests", "pciback.ops"),
        ("pciback.service",),
        ("pciback.cli", "pciback"),
        ("pciback.testing",),
    ),
}

#: What each package's layer says in one line, for the diagram.
ROLES: dict[str, str] = {
    "shared.errors": "one error root",
    "shared.pci": "pure PCI model",
    "shared.sync": "call table, fast lock, conflict detector",
    "shared.protocol": "sans-I/O protocols (pcisplit, vfio-user)",
    "shared.ring": "shared-memory ring (C)",
    "shared.evtchn": "event channels",
    "shared.cli": "CLI helpers",
    "shared.transport": "frame transports",
    "pcifront.core": "sans-I/O client core",
    "pcifront.client": "trio and blocking pumps",
    "pcifront.tools": "lspci, setpci, mount, agent",
    "pciback._ratelog": "rate-limited, counted logs",
    "pciback.devices": "device models and providers",
    "pciback.policy": "config-space policy",
    "pciback.config": "configuration schema",
    "pciback.plane": "device plane: registry, IRQ, DMA, hot-plug",
    "pciback.guests": "front doors: accept, identity, sessions",
    "pciback.ops": "control socket, host view, reload",
    "pciback.service": "composition root",
    "pciback.cli": "the pciback command",
    "pciback.testing": "pytest plugin",
}


@dataclass(frozen=True)
class Import:
    """One import of one of our modules by another: where it is and how it was written."""

    module: str
    path: Path
    line: int
    target: str
    text: str

    def where(self) -> str:
        """``file:line: statement``, for failure messages."""
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted module name of a source file below ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of our packages, by dotted name."""
    return {
        module_name(p, root): p
        for package in PACKAGES
        for p in sorted((root / package).rglob("*.py"))
    }


def imports_of(source: str, module: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """Every import in ``source``, anywhere in the tree, as absolute module names.

    ``from x import y`` imports module ``x.y`` when there is one, else ``x``.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [
                Import(module, path, node.lineno, a.name, f"import {a.name}") for a in node.names
            ]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = ", ".join(alias.name for alias in node.names)
            text = f"from {'.' * node.level}{node.module or ''} import {names}"
            targets = {
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            }
            found += [Import(module, path, node.lineno, t, text) for t in sorted(targets)]
    return found


def import_graph(root: Path = ROOT) -> list[Import]:
    """Every import of one of our modules by another (compiled cffi modules are not ours)."""
    known = modules(root)
    return [
        imp
        for module, path in known.items()
        for imp in imports_of(path.read_text(), module, path, known)
        if imp.target in known and imp.target != module
    ]


def _match(module: str) -> tuple[int, str] | None:
    """``(layer index, group)`` of ``module``: the longest group prefix that contains it."""
    package = module.split(".")[0]
    best: tuple[int, int, str] | None = None
    for index, layer in enumerate(LAYERS.get(package, ())):
        for group in layer:
            inside = module == group or (group != package and module.startswith(group + "."))
            if inside and (best is None or len(group) > best[0]):
                best = (len(group), index, group)
    return None if best is None else (best[1], best[2])


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer within its package (None: in no layer)."""
    found = _match(module)
    return None if found is None else found[0]


def group_of(module: str) -> str:
    """The layer group ``module`` belongs to (``pciback.guests``, ``pcifront.core``, ...)."""
    found = _match(module)
    return module if found is None else found[1]


def unplaced(root: Path = ROOT) -> list[str]:
    """Modules of ours that no layer contains."""
    return [name for name in modules(root) if layer_of(name) is None]


def wrong_arrows(edges: list[Import]) -> list[str]:
    """Imports that go up a layer, across to a sibling, or against the package order.

    Between packages: ``shared`` imports neither side, ``pcifront`` never imports
    ``pciback``; only ``pciback.testing`` (which starts a backend and connects a
    guest) may import ``pcifront``.
    """
    order = {"shared": 0, "pcifront": 1, "pciback": 1}
    wrong: list[str] = []
    for imp in edges:
        source, target = imp.module.split(".")[0], imp.target.split(".")[0]
        if source != target:
            testing_kit = group_of(imp.module) == "pciback.testing" and target == "pcifront"
            if order[target] >= order[source] and not testing_kit:
                wrong.append(f"{imp.where()}  ({source} must not import {target})")
            continue
        low, high = layer_of(imp.target), layer_of(imp.module)
        if low is None or high is None:
            continue  # unplaced() reports these
        mine, theirs = group_of(imp.module), group_of(imp.target)
        if low > high:
            wrong.append(f"{imp.where()}  ({mine} must not import {theirs}, a layer above it)")
        elif low == high and mine != theirs:
            wrong.append(
                f"{imp.where()}  ({mine} and {theirs} are siblings: neither imports the other)"
            )
    return wrong


def find_cycles(edges: list[Import]) -> list[list[Import]]:
    """Each import cycle (a strongly connected set of modules) once, as the imports inside it."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in edges:
        graph[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        # Tarjan's algorithm; the graph is a few hundred nodes, recursion is fine.
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(
        (
            sorted(
                (imp for imp in edges if imp.module in members and imp.target in members),
                key=lambda imp: (imp.module, imp.line),
            )
            for members in components
        ),
        key=lambda cycle: cycle[0].module,
    )


def _node(group: str) -> str:
    return group.replace(".", "_")


def render_diagram(edges: list[Import] | None = None) -> str:
    """A Mermaid flowchart of the layers and every arrow between them, from the code.

    One box per layer group, each package a subgraph with its layers top down;
    an arrow ``A --> B`` means some module of A imports some module of B.
    Arrows between packages are drawn once per pair of packages, except those
    of ``pciback.testing``, the one group that may import the guest side.
    """
    edges = import_graph() if edges is None else edges
    arrows: set[tuple[str, str]] = set()
    for imp in edges:
        source, target = group_of(imp.module), group_of(imp.target)
        src_pkg, dst_pkg = imp.module.split(".")[0], imp.target.split(".")[0]
        if src_pkg != dst_pkg:
            src = _node(source) if source == "pciback.testing" else f"{src_pkg}_pkg"
            arrows.add((src, f"{dst_pkg}_pkg"))
        elif source != target and source in ROLES and target in ROLES:
            arrows.add((_node(source), _node(target)))
    lines = ["```mermaid", "flowchart TB"]
    for package in ("pciback", "pcifront", "shared"):
        lines += [f"  subgraph {package}_pkg [{package}]", "    direction TB"]
        for layer in reversed(LAYERS[package]):
            lines += [
                f'    {_node(group)}["{group}<br/>{ROLES[group]}"]'
                for group in layer
                if group in ROLES
            ]
        lines.append("  end")
    lines += [f"  {src} --> {dst}" for src, dst in sorted(arrows)]
    lines.append("```")
    return "\n".join(lines) + "\n"


BEGIN = "<!-- layer-diagram:begin (generated by tools/archmap.py; do not edit) -->"
END = "<!-- layer-diagram:end -->"
DOC = ROOT / "docs" / "architecture.md"


def embedded(text: str) -> str | None:
    """The diagram between the markers in ``text`` (None: no markers)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(BEGIN) : end].strip("\n") + "\n"


def write_doc(doc: Path = DOC) -> bool:
    """Replace the diagram between the markers in ``doc``; True if it changed."""
    text = doc.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{doc}: no {BEGIN!r} ... {END!r} markers to write between")
    new = text[: start + len(BEGIN)] + "\n" + render_diagram() + text[end:]
    if new != text:
        doc.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    """``python tools/archmap.py [--write]``: print the diagram, or write it into the docs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"update {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.write:
        changed = write_doc()
        print(f"{DOC.relative_to(ROOT)}: {'updated' if changed else 'already current'}")
    else:
        sys.stdout.write(render_diagram())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
