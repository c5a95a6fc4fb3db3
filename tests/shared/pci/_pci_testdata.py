"""Access to the real lspci dumps in ``tests/data/pcidata`` (see its SOURCES.md)."""

from __future__ import annotations

import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "pcidata"
VVV_DIR = DATA_DIR / "vvv-3.9.0"

#: Every dump NAME.txt (not the *.vvv.txt decodes).
DUMP_NAMES = sorted(
    p.name[: -len(".txt")] for p in DATA_DIR.glob("*.txt") if not p.name.endswith("vvv.txt")
)

_CAP_LINE = re.compile(
    r"^\tCapabilities: \[(?P<offset>[0-9a-f]+)(?: v(?P<version>\d+))?\] (?P<text>.*)$"
)


def dump_text(name: str) -> str:
    return (DATA_DIR / f"{name}.txt").read_text()


def vvv_text(name: str) -> str:
    """The pciutils 3.9.0 ``lspci -F NAME.txt -vvv`` decode."""
    return (VVV_DIR / f"{name}.vvv.txt").read_text()


def lspci_capabilities(name: str) -> list[tuple[int, int | None, str]]:
    """``(offset, version or None, text)`` of every capability line lspci decoded."""
    out = []
    for line in vvv_text(name).splitlines():
        match = _CAP_LINE.match(line)
        if match:
            version = int(match["version"]) if match["version"] is not None else None
            out.append((int(match["offset"], 16), version, match["text"]))
    return out
