"""The docs are written for a user who has only the repository.

- no Markdown link, and no path in backticks, leads out of the repository
  (``../shared/...`` beside a checkout, or an absolute path to some machine's
  files): a ``../`` path must name something in the repository; absolute
  paths of the system a user runs on (``/dev/fuse``, ``/sys/bus/pci``,
  ``/run/...``, ``/etc/...``) are fine;
- no working notes of the people who wrote them ("wave 2", "the issue's
  targets", "until those land", "next issue"...);
- no install command names a package index that does not have pcisplit.

Pages: README.md, docs/*.md and examples/; also every ``--help`` text of
``pciback`` and ``pcifront`` (every subcommand).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pciback.cli import build_parser as pciback_parser
from pcifront.cli import build_parser as pcifront_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "examples").glob("*.py")),
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
BACKTICKED = re.compile(r"`([^`\s]+)`")
#: Directories of the system the user runs pcisplit on, not of anyone's machine.
SYSTEM_DIRS = {"dev", "sys", "proc", "run", "etc", "tmp", "usr", "var", "lib", "bin", "sbin",
               "mnt", "path"}
#: Words of a working note: what the writers were doing, not what a user can do.
WORKING_NOTES = re.compile(
    r"\bwave \d|\bthis wave\b|\bthe issue\b|\bissue'?s\b|\bissue \d+|\b(next|later|previous) "
    r"issues?\b|\bother engineers\b|\bengineers'|\buntil those land\b|\bwhen interrupts and "
    r"DMA arrive\b|\bteam material\b|\bTODO\b|\bFIXME\b",
    re.I,
)
INDEX_INSTALL = re.compile(r"pip install\s+['\"]?pcisplit\b")


def _help_texts() -> Iterator[tuple[str, str]]:
    def walk(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, str]]:
        yield name, parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")

    yield from walk(pciback_parser(), "pciback")
    yield from walk(pcifront_parser(), "pcifront")


def _leaves_the_repository(page: Path, target: str) -> bool:
    """A path (link target or backticked text) that points outside the repository."""
    path = target.split("#", 1)[0]
    top = re.match(r"/([\w.-]+)/", path)
    if top is not None:
        return top.group(1) not in SYSTEM_DIRS
    if path.startswith("../"):
        # From a page: inside the repository, and there (a sibling of the checkout is not).
        resolved = (page.parent / path).resolve()
        return not resolved.is_relative_to(ROOT) or not resolved.exists()
    return False


def _outside_paths(page: Path, text: str) -> list[str]:
    found = [t for t in LINK.findall(text) if "://" not in t and _leaves_the_repository(page, t)]
    found += [t for t in BACKTICKED.findall(text) if _leaves_the_repository(page, t)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_link_or_path_leaves_the_repository(page: Path) -> None:
    assert _outside_paths(page, page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_working_notes(page: Path) -> None:
    assert WORKING_NOTES.findall(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_install_from_an_index_that_lacks_pcisplit(page: Path) -> None:
    assert INDEX_INSTALL.findall(page.read_text()) == []


def test_help_texts_are_self_contained() -> None:
    for name, text in _help_texts():
        assert WORKING_NOTES.findall(text) == [], name
        assert INDEX_INSTALL.findall(text) == [], name
        assert _outside_paths(ROOT / "README.md", text) == [], name


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("see `../shared/design/ARCHITECTURE.md` (team material)", True),
        ("[the edu device](../shared/reference/qemu-edu-device.md)", True),
        ("kept in `/work/shared/pcidata/`", True),
        ("the [policy](policy.md) and `docs/cli.md`", False),
        ("mount at `/tmp/guest0`, read `/sys/bus/pci/devices`", False),
        ("[up](../README.md)", False),
    ],
)
def test_the_rule_itself(text: str, bad: bool) -> None:
    page = ROOT / "docs" / "page.md"
    assert bool(_outside_paths(page, text)) == bad
    assert bool(WORKING_NOTES.search("the issue's targets, wave 2")) is True
    assert WORKING_NOTES.search("an interrupt is issued") is None
