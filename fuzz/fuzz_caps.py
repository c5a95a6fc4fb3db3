"""Fuzz target: the capability walker (``shared.pci.walk_capabilities``).

Any config image walks without raising or looping; every capability found
lies inside the image, and problems are reported, not raised.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import instrumented

with instrumented(__name__, ["shared.pci"]):
    from shared.pci import walk_capabilities


def test_one_input(data: bytes) -> None:
    size = 256 if len(data) <= 256 else 4096
    image = data[:size].ljust(size, b"\x00")
    walk = walk_capabilities(image)
    caps = list(walk)
    if len(caps) > size // 4:
        raise AssertionError(f"{len(caps)} capabilities in a {size}-byte image: a loop")
    for cap in caps:
        if not 0 <= cap.offset < size:
            raise AssertionError(f"capability at {cap.offset:#x} outside the image")


if __name__ == "__main__":
    from _common import run

    run(test_one_input)
