"""pcifront's client core is sans-I/O: it imports no trio, no socket, no clock and no transport.

The direction of pcifront's own layers (core, client, tools, the public
modules) and the absence of cycles are checked with the rest of the tree in
``tests/test_layers.py``, from the order written in ``tools/archmap.py``.
This test adds what only the core promises: it decides what every frame means
without doing any I/O, so both the trio and the blocking client can pump it.
"""

from __future__ import annotations

from tools import archmap

#: What no module of pcifront/core may import (prefixes).
NO_IO = ("trio", "socket", "time", "select", "shared.transport")


def _core_imports() -> list[tuple[str, str]]:
    known = archmap.modules()
    return [
        (imp.where(), imp.target)
        for name, path in known.items()
        if name == "pcifront.core" or name.startswith("pcifront.core.")
        for imp in archmap.imports_of(path.read_text(), name, path, known)
    ]


def test_the_core_does_no_io() -> None:
    found = _core_imports()
    assert found, "read no import of pcifront/core"
    wrong = [
        where
        for where, target in found
        if any(target == bad or target.startswith(bad + ".") for bad in NO_IO)
    ]
    assert not wrong, "pcifront/core must stay sans-I/O:\n" + "\n".join(wrong)
