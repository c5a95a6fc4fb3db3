"""This repository's pytest plugin (``-p tests.docs.plugin`` in pyproject.toml): docs are tests.

Every fenced code block in README.md and docs/*.md runs (rules: docs/README.md,
machinery: tests/docs/docsrunner.py). Shell sessions use pcisplit installed from
its wheel into a separate venv (tests/docs/installed.py), built once per session.
(A plugin rather than a top-level conftest.py, so that ``import conftest`` in a
test directory keeps meaning that directory's conftest.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.docsrunner import make_sybil
from tests.docs.installed import Installed, build_and_install

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pcisplit_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """pcisplit's sdist and wheel, and a venv with the wheel (and its testing extra)."""
    yield build_and_install(ROOT, tmp_path_factory.mktemp("dist"))


pytest_collect_file = make_sybil(
    ["README.md", "docs/*.md"], ROOT, fixtures=["pcisplit_installed"]
).pytest()
