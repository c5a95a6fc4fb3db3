"""The layer map in ``docs/architecture.md`` is generated from the code and kept current.

``tools/archmap.py`` reads every import with ``ast`` and holds the layer order;
these tests check its reading on small synthetic trees (so the checks in
``tests/test_layers.py`` cannot pass by reading nothing) and that the page
embeds the diagram the code gives today.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import archmap


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_doc_embeds_the_current_diagram() -> None:
    text = archmap.DOC.read_text()
    found = archmap.embedded(text)
    assert found is not None, "docs/architecture.md lost its layer-diagram markers"
    assert found == archmap.render_diagram(), (
        "docs/architecture.md's layer diagram is stale: run `python tools/archmap.py --write`"
    )


def test_every_import_is_read_also_hidden_ones(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "pciback/__init__.py": "",
            "pciback/plane/__init__.py": "",
            "pciback/plane/registry.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pciback.guests import session\n"
                "def f():\n    from ..service import Backend\n"
            ),
            "pciback/guests/__init__.py": "",
            "pciback/guests/session.py": "import pciback.plane.registry\n",
            "pciback/service.py": "",
            "shared/__init__.py": "",
            "pcifront/__init__.py": "",
        },
    )
    known = archmap.modules(root)
    path = root / "pciback/plane/registry.py"
    targets = {
        imp.target
        for imp in archmap.imports_of(path.read_text(), "pciback.plane.registry", path, known)
    }
    assert targets == {"typing", "pciback.guests.session", "pciback.service"}


def _edge(module: str, target: str) -> archmap.Import:
    return archmap.Import(module, archmap.ROOT / "x.py", 1, target, f"import {target}")


@pytest.mark.parametrize(
    ("module", "target", "complaint"),
    [
        ("pciback.plane.hotplug", "pciback.guests.dispatch", "a layer above it"),
        ("pciback.guests.session", "pciback.ops.control_server", "siblings"),
        ("pciback.config", "pciback.service", "a layer above it"),
        ("shared.protocol", "pciback.service", "shared must not import pciback"),
        ("pcifront.core.session", "pciback.registry", "pcifront must not import pciback"),
        ("pcifront.core.session", "pcifront.client.bus", "a layer above it"),
        ("shared.pci", "shared.transport", "a layer above it"),
    ],
)
def test_arrows_against_the_order_are_named(module: str, target: str, complaint: str) -> None:
    (wrong,) = archmap.wrong_arrows([_edge(module, target)])
    assert complaint in wrong


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("pciback.guests.session", "pciback.plane.registry"),
        ("pciback.testing._kit", "pcifront"),
        ("pcifront.client.bus", "shared.transport"),
        ("pciback.plane.registry", "pciback.plane.access"),
    ],
)
def test_arrows_down_the_order_pass(module: str, target: str) -> None:
    assert archmap.wrong_arrows([_edge(module, target)]) == []


def test_cycles_are_found_with_every_member() -> None:
    edges = [_edge("a.x", "a.y"), _edge("a.y", "a.z"), _edge("a.z", "a.x"), _edge("a.z", "a.w")]
    (cycle,) = archmap.find_cycles(edges)
    assert [imp.module for imp in cycle] == ["a.x", "a.y", "a.z"]
    assert archmap.find_cycles(edges[:2]) == []


def test_every_module_has_a_layer() -> None:
    assert archmap.unplaced() == [], "add these modules' groups to tools/archmap.py LAYERS"
