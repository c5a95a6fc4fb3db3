"""A reader for the PCI ID database (``pci.ids``) that lspci uses for names.

The file maps numeric IDs to names in a tab-indented outline::

    vvvv  Vendor name
    \tdddd  Device name
    \t\tssss ssss  Subsystem name          (subvendor subdevice)
    C cc  Class name
    \tss  Subclass name
    \t\tpp  Programming interface name
    S vvvv                                 (generic subsystems of vendor vvvv)
    \tdddd  Subsystem name

The grammar accepted here is the one pciutils' ``names-parse.c`` accepts, so a
well-formed file yields exactly the names lspci prints: hex IDs in either case,
one space or tab after an ID, names with leading blanks stripped and trailing
ones kept, ``#`` comments only in the first column, unknown upper-case blocks
(``X ...``) skipped with their children.

Where pciutils gives up on the *whole* file at the first bad line, we skip the
bad line (and the entries nested under it, which have no valid parent), count
it, and keep going: a damaged database should cost a few names, not all of them.
"""

from __future__ import annotations

import gzip
import os
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from shared.errors import PcisplitError

__all__ = ["PciIds", "PciIdsError", "DEFAULT_PCI_IDS_PATHS"]

#: Where lspci looks when ``-i`` is not given: the compiled-in ``.gz`` name
#: first, then the same name without ``.gz`` (what pciutils' ``pci_open`` does).
DEFAULT_PCI_IDS_PATHS: Final = ("/usr/share/misc/pci.ids.gz", "/usr/share/misc/pci.ids")

#: How many problem descriptions we keep for diagnostics (the count is exact).
_MAX_PROBLEMS: Final = 20

_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_BLANKS: Final = " \t"

# Parser states: which kind of entry the most recent line at each depth was.
# They mirror the categories of pciutils so nesting rules stay identical.
_NONE: Final = 0  # before the first top-level entry
_VENDOR: Final = 1
_DEVICE: Final = 2
_SUBSYSTEM: Final = 3
_GEN_SUBSYSTEM: Final = 4
_CLASS: Final = 5
_SUBCLASS: Final = 6
_PROGIF: Final = 7
_UNKNOWN_BLOCK: Final = 8  # a reserved upper-case block: children are ignored silently


class PciIdsError(PcisplitError):
    """The ID database exists but cannot be read (permissions, not a file, bad gzip)."""


def _hex(text: str, start: int, count: int) -> int:
    """The ``count``-digit hex number at ``start``, or -1 if it is not one."""
    part = text[start : start + count]
    if len(part) != count:
        return -1
    for char in part:
        if char not in _HEX_DIGITS:
            return -1
    return int(part, 16)


def _blank_at(text: str, index: int) -> bool:
    return index < len(text) and text[index] in _BLANKS


class _Problem(Exception):
    """Internal: one malformed line. Never escapes :meth:`PciIds.parse`."""


class PciIds:
    """A parsed ``pci.ids`` database with lookups by numeric ID.

    Every lookup returns the name exactly as written in the file, or ``None``
    when the file has no entry. Build one with :meth:`load` (a file, cached) or
    :meth:`parse` (text).
    """

    __slots__ = (
        "_classes",
        "_devices",
        "_gen_subsystems",
        "_prog_ifs",
        "_subclasses",
        "_subsystems",
        "_vendors",
        "problems",
        "skipped_lines",
        "source",
    )

    _cache: dict[tuple[str, int, int], PciIds] = {}
    _cache_lock = threading.Lock()

    def __init__(self, source: str = "<string>") -> None:
        self.source = source
        #: How many lines were skipped because they (or their parent) were malformed.
        self.skipped_lines = 0
        #: Descriptions of the first skipped lines, ``"path:line: reason"``.
        self.problems: list[str] = []
        self._vendors: dict[int, str] = {}
        self._devices: dict[int, str] = {}
        self._subsystems: dict[int, str] = {}
        self._gen_subsystems: dict[int, str] = {}
        self._classes: dict[int, str] = {}
        self._subclasses: dict[int, str] = {}
        self._prog_ifs: dict[int, str] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PciIds | None:
        """Load the database from ``path`` (default: lspci's default locations).

        Returns ``None`` when the file does not exist, as lspci then falls back
        to numbers. A file is parsed once: later calls for the same unchanged
        file return the same object. A ``.gz`` file is decompressed.

        Raises :class:`PciIdsError` when the file exists but cannot be read.
        """
        candidates: Iterable[str | os.PathLike[str]] = (
            DEFAULT_PCI_IDS_PATHS if path is None else (path,)
        )
        for candidate in candidates:
            try:
                stat = os.stat(candidate)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise PciIdsError(
                    f"cannot inspect the PCI ID database {os.fspath(candidate)!r}: {exc}; "
                    "fix its permissions or pass another file"
                ) from exc
            key = (os.path.realpath(candidate), stat.st_mtime_ns, stat.st_size)
            with cls._cache_lock:
                cached = cls._cache.get(key)
                if cached is None:
                    cached = cls.parse(_read_text(candidate), source=os.fspath(candidate))
                    cls._cache[key] = cached
            return cached
        return None

    @classmethod
    def parse(cls, text: str, *, source: str = "<string>") -> PciIds:
        """Parse the text of a ``pci.ids`` file. Malformed lines are skipped and counted."""
        ids = cls(source)
        ids._parse(text)
        return ids

    def _skip(self, lineno: int, reason: str) -> None:
        self.skipped_lines += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{self.source}:{lineno}: {reason}")

    def _parse(self, text: str) -> None:
        state = _NONE
        vendor = device = klass = subclass = 0
        # After a malformed line at depth N, deeper lines have no valid parent:
        # skip them until the next line at depth N or less.
        orphans_below: int | None = None
        for lineno, line in enumerate(text.split("\n"), 1):
            # pciutils ends a line at the first CR or LF.
            cut = line.find("\r")
            if cut >= 0:
                line = line[:cut]
            if not line or line[0] == "#":
                continue
            depth = len(line) - len(line.lstrip("\t"))
            if orphans_below is not None:
                if depth > orphans_below:
                    self._skip(lineno, "entry under a skipped line")
                    continue
                orphans_below = None
            try:
                if depth == 0:
                    state, vendor, klass = self._top_level(line)
                    device = subclass = 0
                elif state == _UNKNOWN_BLOCK:
                    continue
                elif depth == 1:
                    state, device, subclass = self._level_one(line, state, vendor, klass)
                elif depth == 2:
                    state = self._level_two(line, state, vendor, device, klass, subclass)
                else:
                    raise _Problem("nested deeper than two tabs")
            except _Problem as problem:
                self._skip(lineno, str(problem))
                orphans_below = depth

    def _top_level(self, line: str) -> tuple[int, int, int]:
        """Handle an unindented line; returns (state, vendor, class)."""
        if line.startswith("C "):
            klass = _hex(line, 2, 2)
            if klass < 0 or not _blank_at(line, 4):
                raise _Problem("class line needs 'C cc  name'")
            self._insert(self._classes, klass, line, 5)
            return _CLASS, 0, klass
        if line.startswith("S "):
            vendor = _hex(line, 2, 4)
            if vendor < 0 or len(line) != 6:
                raise _Problem("generic subsystem line needs exactly 'S vvvv'")
            if vendor not in self._vendors:
                raise _Problem(f"generic subsystems of vendor {vendor:04x}, which is not listed")
            return _GEN_SUBSYSTEM, vendor, 0
        if "A" <= line[0] <= "Z" and len(line) > 1 and line[1] == " ":
            return _UNKNOWN_BLOCK, 0, 0
        vendor = _hex(line, 0, 4)
        if vendor < 0 or not _blank_at(line, 4):
            raise _Problem("vendor line needs 'vvvv  name'")
        self._insert(self._vendors, vendor, line, 5)
        return _VENDOR, vendor, 0

    def _level_one(self, line: str, state: int, vendor: int, klass: int) -> tuple[int, int, int]:
        """Handle a one-tab line; returns (state, device, subclass)."""
        if state in (_VENDOR, _DEVICE, _SUBSYSTEM, _GEN_SUBSYSTEM):
            device = _hex(line, 1, 4)
            if device < 0 or not _blank_at(line, 5):
                raise _Problem("device line needs '<tab>dddd  name'")
            if state == _GEN_SUBSYSTEM:
                # ``vendor`` is the subsystem vendor of the enclosing ``S`` block.
                self._insert(self._gen_subsystems, vendor << 16 | device, line, 6)
                return _GEN_SUBSYSTEM, device, 0
            self._insert(self._devices, vendor << 16 | device, line, 6)
            return _DEVICE, device, 0
        if state in (_CLASS, _SUBCLASS, _PROGIF):
            subclass = _hex(line, 1, 2)
            if subclass < 0 or not _blank_at(line, 3):
                raise _Problem("subclass line needs '<tab>ss  name'")
            self._insert(self._subclasses, klass << 8 | subclass, line, 4)
            return _SUBCLASS, 0, subclass
        raise _Problem("indented line outside any vendor or class block")

    def _level_two(
        self, line: str, state: int, vendor: int, device: int, klass: int, subclass: int
    ) -> int:
        """Handle a two-tab line; returns the new state."""
        if state in (_DEVICE, _SUBSYSTEM):
            sub_vendor = _hex(line, 2, 4)
            sub_device = _hex(line, 7, 4)
            if min(sub_vendor, sub_device) < 0 or not (_blank_at(line, 6) and _blank_at(line, 11)):
                raise _Problem("subsystem line needs '<tab><tab>vvvv dddd  name'")
            key = vendor << 48 | device << 32 | sub_vendor << 16 | sub_device
            self._insert(self._subsystems, key, line, 12)
            return _SUBSYSTEM
        if state in (_CLASS, _SUBCLASS, _PROGIF):
            # Directly under a class line the subclass is 00, as in pciutils.
            prog_if = _hex(line, 2, 2)
            if prog_if < 0 or not _blank_at(line, 4):
                raise _Problem("prog-if line needs '<tab><tab>pp  name'")
            self._insert(self._prog_ifs, klass << 16 | subclass << 8 | prog_if, line, 5)
            return _PROGIF
        raise _Problem("two-tab line without a device or subclass above it")

    @staticmethod
    def _insert(table: dict[int, str], key: int, line: str, name_at: int) -> None:
        name = line[name_at:].lstrip(_BLANKS)
        if not name:
            raise _Problem("entry has no name")
        if key in table:
            # pciutils rejects the whole file here; we keep the first name.
            raise _Problem("duplicate entry (the first one is kept)")
        table[key] = name

    # ------------------------------------------------------------------ lookups

    def vendor_name(self, vendor: int) -> str | None:
        """The name of vendor ``vendor``."""
        return self._vendors.get(vendor)

    def device_name(self, vendor: int, device: int) -> str | None:
        """The name of device ``vendor:device``."""
        return self._devices.get(vendor << 16 | device)

    def subsystem_name(
        self, vendor: int, device: int, sub_vendor: int, sub_device: int
    ) -> str | None:
        """The name of subsystem ``sub_vendor:sub_device`` of device ``vendor:device``.

        Looks at the device's own subsystem list first, then at the generic
        ``S`` blocks, the order lspci uses.
        """
        name = self._subsystems.get(vendor << 48 | device << 32 | sub_vendor << 16 | sub_device)
        if name is None:
            name = self._gen_subsystems.get(sub_vendor << 16 | sub_device)
        return name

    def class_name(self, base_class: int) -> str | None:
        """The name of base class ``base_class`` (the config byte at 0x0b)."""
        return self._classes.get(base_class)

    def subclass_name(self, base_class: int, subclass: int) -> str | None:
        """The name of subclass ``subclass`` (config byte 0x0a) of ``base_class``."""
        return self._subclasses.get(base_class << 8 | subclass)

    def prog_if_name(self, base_class: int, subclass: int, prog_if: int) -> str | None:
        """The name of programming interface ``prog_if`` (config byte 0x09)."""
        return self._prog_ifs.get(base_class << 16 | subclass << 8 | prog_if)

    def device_ids(self) -> list[tuple[int, int]]:
        """Every ``(vendor, device)`` pair the database names, in file order."""
        return [(key >> 16, key & 0xFFFF) for key in self._devices]

    def class_ids(self) -> list[tuple[int, int | None]]:
        """Every ``(base_class, subclass)`` the database names; ``None``: base class only."""
        return [(key, None) for key in self._classes] + [
            (key >> 8, key & 0xFF) for key in self._subclasses
        ]

    def statistics(self) -> dict[str, int]:
        """Entry counts per kind, and the number of skipped lines."""
        return {
            "vendors": len(self._vendors),
            "devices": len(self._devices),
            "subsystems": len(self._subsystems),
            "generic_subsystems": len(self._gen_subsystems),
            "classes": len(self._classes),
            "subclasses": len(self._subclasses),
            "prog_ifs": len(self._prog_ifs),
            "skipped_lines": self.skipped_lines,
        }

    def __repr__(self) -> str:
        return (
            f"<PciIds {self.source!r}: {len(self._vendors)} vendors, "
            f"{len(self._devices)} devices, {self.skipped_lines} skipped lines>"
        )


def _read_text(path: str | os.PathLike[str]) -> str:
    """Read (and, for ``.gz``, decompress) the file as text."""
    try:
        raw = Path(path).read_bytes()
        if os.fspath(path).endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise PciIdsError(
            f"cannot read the PCI ID database {os.fspath(path)!r}: {exc}; "
            "fix the file or pass another one"
        ) from exc
    # The file is UTF-8; a stray bad byte costs one character, not the database.
    return raw.decode("utf-8", errors="replace")
