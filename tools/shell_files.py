#!/usr/bin/env python3
"""Man pages and shell completion for ``pciback`` and ``pcifront``, from their parsers.

``make install`` runs this into the virtual environment's ``share/``::

    .venv/share/man/man1/pciback.1            man pages (every subcommand, every option)
    .venv/share/man/man1/pcifront.1
    .venv/share/bash-completion/completions/pciback   bash completion scripts
    .venv/share/bash-completion/completions/pcifront
    .venv/share/zsh/site-functions/_pciback           zsh completion functions
    .venv/share/zsh/site-functions/_pcifront

Usage: ``python tools/shell_files.py [--out DIR]`` (default: the running
Python's ``sys.prefix``/share). The generators are argparse-manpage and shtab
(the ``shell`` extra); both read the same ``argparse`` parsers ``--help`` prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from build_manpages.manpage import Manpage  # noqa: E402
from shtab import complete  # noqa: E402

from pciback.cli import build_parser as pciback_parser  # noqa: E402
from pcifront.cli import build_parser as pcifront_parser  # noqa: E402
from shared.cli import package_version  # noqa: E402

COMMANDS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "pciback": pciback_parser,
    "pcifront": pcifront_parser,
}


def man_page(parser: argparse.ArgumentParser) -> str:
    """The roff text of ``parser``'s man page (section 1)."""
    page = Manpage(parser)
    page.source = f"pcisplit {package_version()}"
    page.manual = "pcisplit manual"
    return str(page)


def generate(share: Path) -> list[Path]:
    """Write every man page and completion script under ``share``; return their paths."""
    written = []
    for name, build in COMMANDS.items():
        parser = build()
        files = {
            share / "man" / "man1" / f"{name}.1": man_page(parser),
            share / "bash-completion" / "completions" / name: complete(parser, "bash"),
            share / "zsh" / "site-functions" / f"_{name}": complete(parser, "zsh"),
        }
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(sys.prefix) / "share",
                        help="the share/ directory to write into")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
