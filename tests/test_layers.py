"""The layers point one way: no import cycle, and no import against the layer order.

The order is written once, in ``tools/archmap.py`` (``LAYERS``), bottom first:

* ``shared`` is the foundation of both sides and imports neither ``pciback``
  nor ``pcifront``: ``errors``; then ``pci``, ``sync``, ``protocol``, ``ring``,
  ``evtchn``, ``cli`` (siblings); then ``transport``.
* ``pcifront`` (the guest agent) imports ``shared`` and never ``pciback``:
  ``core`` (sans-I/O), ``client`` (the trio and blocking pumps), ``tools``
  (lspci, setpci, mount, agent), then the public modules.
* ``pciback`` (the backend): ``_ratelog``, ``devices``, ``policy``,
  ``config``, ``plane`` (the device plane), ``guests`` and ``ops`` (siblings:
  neither imports the other), ``service`` (the composition root), ``cli`` and
  the package's ``__init__``, and ``testing`` on top, the one place that may
  import ``pcifront`` too.

A module imports its own layer group and the layers below it; sibling groups
never import each other. Imports are read from the source with ``ast``,
counting module-level ones, those under ``if TYPE_CHECKING:`` and those inside
functions: an import the interpreter never runs is still an arrow for the
reader. Each failure names the importing file, its line and the import.
``tests/test_archmap.py`` checks the reader itself on synthetic trees.
"""

from __future__ import annotations

import pytest

from tools import archmap

EDGES = archmap.import_graph()


def test_every_module_has_a_layer() -> None:
    lost = archmap.unplaced()
    assert not lost, f"modules in no layer (add their group to tools/archmap.py LAYERS): {lost}"


def test_the_reader_found_the_imports() -> None:
    # A reader that read nothing would pass every test below.
    sources = {imp.module.split(".")[0] for imp in EDGES}
    assert sources == set(archmap.PACKAGES)
    assert len(EDGES) > 300


@pytest.mark.parametrize("package", archmap.PACKAGES)
def test_imports_point_down_the_layers(package: str) -> None:
    wrong = [line for line in archmap.wrong_arrows(EDGES) if line.startswith(package + "/")]
    assert not wrong, f"imports against {package}'s layer order:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", archmap.PACKAGES)
def test_no_import_cycle(package: str) -> None:
    cycles = [
        cycle
        for cycle in archmap.find_cycles(EDGES)
        if any(imp.module.split(".")[0] == package for imp in cycle)
    ]
    assert not cycles, f"import cycles through {package}:\n" + "\n\n".join(
        "\n".join(imp.where() for imp in cycle) for cycle in cycles
    )
