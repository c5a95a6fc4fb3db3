"""The pci.ids reader: the grammar pciutils accepts, tolerance, loading and caching."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest

from pcifront.tools.pciids import PciIds, PciIdsError

REAL_PCI_IDS = Path("/usr/share/misc/pci.ids")

GOOD = """\
#
#\tList of PCI ID's (a comment: '#' in the first column)
#

0001  SafeNet (wrong ID)
8086  Intel Corporation
\t1502  82579LM Gigabit Network Connection (Lewisville)
\t\t1028 04a3  Precision M4700
\t\t17aa 21ce  ThinkPad T520
\t10C9  82576 Gigabit Network Connection
\t\t8086 A03C  Gigabit ET Dual Port Server Adapter
10ec\tRealtek Semiconductor Co., Ltd.
\t8168 \t  RTL8111/8168/8411 PCI Express Gigabit Ethernet Controller  \r
S 10ec
\t0001  Generic Realtek subsystem

C 00  Unclassified device
\t00  Non-VGA unclassified device
C 01  Mass storage controller
\t\t05  Prog-if directly under a class
\t06  SATA controller
\t\t01  AHCI 1.0
\t\t02  Serial Storage Bus
X 12  A reserved block nobody knows yet
\tff  ignored without complaint
\t\tff  also ignored
C 0c  Serial bus controller
\t03  USB controller
\t\t30  XHCI
"""


def test_grammar() -> None:
    ids = PciIds.parse(GOOD, source="good.ids")
    assert ids.skipped_lines == 0, ids.problems
    assert ids.vendor_name(0x0001) == "SafeNet (wrong ID)"
    assert ids.vendor_name(0x8086) == "Intel Corporation"
    assert ids.device_name(0x8086, 0x1502) == "82579LM Gigabit Network Connection (Lewisville)"
    assert ids.device_name(0x8086, 0x10C9) == "82576 Gigabit Network Connection"  # upper-case ID
    assert ids.subsystem_name(0x8086, 0x1502, 0x17AA, 0x21CE) == "ThinkPad T520"
    assert (
        ids.subsystem_name(0x8086, 0x10C9, 0x8086, 0xA03C) == "Gigabit ET Dual Port Server Adapter"
    )
    # A tab after the ID works; leading blanks go, trailing ones stay; CR ends the line.
    assert ids.vendor_name(0x10EC) == "Realtek Semiconductor Co., Ltd."
    assert ids.device_name(0x10EC, 0x8168) == (
        "RTL8111/8168/8411 PCI Express Gigabit Ethernet Controller  "
    )
    # Generic subsystems answer for any device.
    assert ids.subsystem_name(0x10EC, 0x8168, 0x10EC, 0x0001) == "Generic Realtek subsystem"
    assert ids.subsystem_name(0x8086, 0x1502, 0x10EC, 0x0001) == "Generic Realtek subsystem"
    assert ids.class_name(0x00) == "Unclassified device"
    assert ids.subclass_name(0x00, 0x00) == "Non-VGA unclassified device"
    assert ids.subclass_name(0x01, 0x06) == "SATA controller"
    assert ids.prog_if_name(0x01, 0x06, 0x01) == "AHCI 1.0"
    assert ids.prog_if_name(0x0C, 0x03, 0x30) == "XHCI"
    # pciutils files a prog-if right under a class line as subclass 00.
    assert ids.prog_if_name(0x01, 0x00, 0x05) == "Prog-if directly under a class"
    # The reserved X block and its children are not entries.
    assert ids.class_name(0x12) is None and ids.subclass_name(0x12, 0xFF) is None
    assert ids.statistics() == {
        "vendors": 3,
        "devices": 3,
        "subsystems": 3,
        "generic_subsystems": 1,
        "classes": 3,
        "subclasses": 3,
        "prog_ifs": 4,
        "skipped_lines": 0,
    }


def test_unknown_ids_are_none() -> None:
    ids = PciIds.parse(GOOD)
    assert ids.vendor_name(0x1234) is None
    assert ids.device_name(0x8086, 0xFFFF) is None
    assert ids.device_name(0x1234, 0x1502) is None
    assert ids.subsystem_name(0x8086, 0x1502, 0x1028, 0xFFFF) is None
    assert ids.class_name(0x20) is None
    assert ids.subclass_name(0x0C, 0x80) is None
    assert ids.prog_if_name(0x0C, 0x03, 0x40) is None


BAD = """\
8086  Intel Corporation
\t1502  good device
\t\t1028 04a3  good subsystem
\tzz02  bad device id
\t\t1028 0001  orphan: must not land on 8086:1502
\t1503
\t1504  good again
\t\t\t1234  three tabs
12g4  bad vendor id
\t0001  orphan device
\t\t0001 0001  orphan subsystem
8086  Intel again (duplicate)
10de  NVIDIA Corporation
\t\tabcd 0001  subsystem without a device
S 1234
\t0001  under an S block of an unknown vendor
S 10de trailing
\tinvalid
C 0x  bad class
\t00  orphan subclass
C 02  Network controller
\t0  short subclass
\t00  Ethernet controller
1af4Red Hat (no blank)
#  a comment is fine
1af4  Red Hat, Inc.
"""


def test_malformed_lines_are_skipped_and_counted() -> None:
    ids = PciIds.parse(BAD, source="bad.ids")
    assert ids.device_name(0x8086, 0x1502) == "good device"
    assert ids.subsystem_name(0x8086, 0x1502, 0x1028, 0x04A3) == "good subsystem"
    assert ids.subsystem_name(0x8086, 0x1502, 0x1028, 0x0001) is None
    assert ids.device_name(0x8086, 0x1504) == "good again"
    assert ids.device_name(0x8086, 0x1503) is None
    assert ids.vendor_name(0x8086) == "Intel Corporation"  # the first of a duplicate wins
    assert ids.vendor_name(0x10DE) == "NVIDIA Corporation"
    assert ids.subclass_name(0x02, 0x00) == "Ethernet controller"
    assert ids.vendor_name(0x1AF4) == "Red Hat, Inc."
    skipped = [
        4,  # bad device id
        5,  # its subsystem (orphan)
        6,  # device without a name
        8,  # three tabs
        9,  # bad vendor
        10,  # orphan device
        11,  # orphan subsystem
        12,  # duplicate vendor
        14,  # subsystem right under a vendor
        15,  # S block of an unknown vendor
        16,  # its entry (orphan)
        17,  # S line with trailing text
        18,  # its entry (orphan)
        19,  # bad class
        20,  # orphan subclass
        22,  # short subclass
        24,  # vendor without a blank
    ]
    assert ids.skipped_lines == len(skipped)
    assert [int(problem.split(":")[1]) for problem in ids.problems] == skipped
    assert ids.problems[0].startswith("bad.ids:4: ")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "\t\t\t",
        "\x00\x01garbage",
        "C",
        "S ",
        "\tabcd  x",
        "ffff  " * 1000,
        "C 01\n\t\t",
    ],
)
def test_never_crashes(text: str) -> None:
    ids = PciIds.parse(text)
    assert ids.skipped_lines >= 0


def test_problem_list_is_bounded_but_count_is_exact() -> None:
    ids = PciIds.parse("zzzz  bad\n" * 500)
    assert ids.skipped_lines == 500
    assert len(ids.problems) == 20


def test_load_missing_file_is_none(tmp_path: Path) -> None:
    assert PciIds.load(tmp_path / "absent.ids") is None


def test_load_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "pci.ids"
    path.write_text("1234  First name\n")
    first = PciIds.load(path)
    assert first is not None and first.vendor_name(0x1234) == "First name"
    assert PciIds.load(str(path)) is first
    path.write_text("1234  A different, longer name\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    second = PciIds.load(path)
    assert second is not None and second is not first
    assert second.vendor_name(0x1234) == "A different, longer name"


def test_load_gzip(tmp_path: Path) -> None:
    path = tmp_path / "pci.ids.gz"
    path.write_bytes(gzip.compress(b"1234  Zipped vendor\n"))
    ids = PciIds.load(path)
    assert ids is not None and ids.vendor_name(0x1234) == "Zipped vendor"


def test_unreadable_database_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(PciIdsError, match="cannot read"):
        PciIds.load(tmp_path)  # a directory exists but is no file
    broken = tmp_path / "broken.ids.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(PciIdsError, match=r"broken\.ids\.gz"):
        PciIds.load(broken)


def test_bad_utf8_costs_a_character_not_the_file() -> None:
    ids = PciIds.parse(b"1234  Caf\xe9 vendor\n".decode("utf-8", errors="replace"))
    assert ids.vendor_name(0x1234) == "Caf\ufffd vendor"


@pytest.mark.skipif(not REAL_PCI_IDS.is_file(), reason=f"{REAL_PCI_IDS} is missing")
def test_real_database() -> None:
    started = time.perf_counter()
    ids = PciIds.parse(REAL_PCI_IDS.read_text(), source=str(REAL_PCI_IDS))
    elapsed = time.perf_counter() - started
    # About 0.1 s here; the bound leaves room for slow CI machines.
    assert elapsed < 1.0
    assert ids.skipped_lines == 0, ids.problems
    stats = ids.statistics()
    assert stats["vendors"] > 2000 and stats["devices"] > 15000 and stats["classes"] > 20
    assert ids.vendor_name(0x8086) == "Intel Corporation"
    assert ids.subsystem_name(0x8086, 0x10C9, 0x8086, 0xA03C) == (
        "Gigabit ET Dual Port Server Adapter"
    )
    assert ids.prog_if_name(0x0C, 0x03, 0x30) == "XHCI"
    assert ids.vendor_name(0x1234) is None  # so the edu device shows "Device 1234:11e8"


@pytest.mark.skipif(not REAL_PCI_IDS.is_file(), reason=f"{REAL_PCI_IDS} is missing")
def test_default_load_finds_the_system_database() -> None:
    ids = PciIds.load()
    assert ids is not None and ids.vendor_name(0x8086) == "Intel Corporation"


def test_listing_what_is_named() -> None:
    ids = PciIds.parse(GOOD)
    assert ids.device_ids() == [(0x8086, 0x1502), (0x8086, 0x10C9), (0x10EC, 0x8168)]
    assert ids.class_ids() == [
        (0x00, None),
        (0x01, None),
        (0x0C, None),
        (0x00, 0x00),
        (0x01, 0x06),
        (0x0C, 0x03),
    ]
