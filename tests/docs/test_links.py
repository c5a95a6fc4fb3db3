"""Links in README.md and docs/*.md lead somewhere (rules: docs/README.md, "Links").

- A Markdown link to a file must name an existing file; its ``#fragment`` a heading.
- A repository path in backticks (`` `docs/policy.md` ``, `` `pciback/cli.py` ``) must
  exist, unless .gitignore says it is generated (``benchmarks/results/``).
- Links to other sites are checked for form only: the test machines have no network.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TOP_DIRS = (
    "pciback", "pcifront", "shared", "tests", "docs", "examples", "benchmarks", "fuzz", "tools",
    "vm",
)
REPO_PATH = re.compile(r"`((?:" + "|".join(TOP_DIRS) + r")/[\w./*-]*)`")
FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1", re.M | re.S)


def _prose(text: str) -> str:
    """The page without its fenced code blocks (those are run, not followed)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(page.read_text()), re.M)
    return {_slug(h) for h in headings}


def _ignored(relpath: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = relpath.rstrip("/").split("/")
    # The path itself, or any directory above it (``benchmarks/results/x.json``).
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(
        fnmatch.fnmatch(c, p.strip("/")) for c in candidates for p in patterns
    )


def _problems(page: Path) -> list[str]:
    prose = _prose(page.read_text())
    problems = []
    for target in LINK.findall(prose):
        url = urlsplit(target)
        if url.scheme in ("http", "https"):
            if not url.netloc:
                problems.append(f"{target}: a web link needs a host")
            continue
        if url.scheme == "mailto":
            continue
        if url.scheme:
            problems.append(f"{target}: unknown link scheme {url.scheme!r}")
            continue
        dest = (page.parent / url.path).resolve() if url.path else page
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
        elif url.fragment and dest.suffix == ".md" and url.fragment not in _anchors(dest):
            problems.append(f"{target}: no heading #{url.fragment} in {dest.name}")
    for relpath in REPO_PATH.findall(prose):
        relpath = relpath.rstrip(".")
        exists = any(ROOT.glob(relpath)) if "*" in relpath else (ROOT / relpath).exists()
        if not exists and not _ignored(relpath):
            problems.append(f"`{relpath}` does not exist in the repository")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(page: Path) -> None:
    problems = _problems(page)
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_checker_finds_dead_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\nSee [a](missing.md), [b](page.md#nowhere), [c](page.md#title),\n"
        "[d](https:///x), `docs/no-such-page.md` and `docs/README.md`,\n"
        "`benchmarks/results/run.json` (generated: .gitignore names it).\n"
        "```\n[not a link](in-a-block.md)\n```\n"
    )
    problems = _problems(page)
    assert len(problems) == 4, problems
    assert any("missing.md" in p for p in problems)
    assert any("#nowhere" in p for p in problems)
    assert any("needs a host" in p for p in problems)
    assert any("docs/no-such-page.md" in p for p in problems)
