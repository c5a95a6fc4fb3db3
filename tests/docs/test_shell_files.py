"""Man pages and shell completion (``tools/shell_files.py``, run by ``make install``).

The man page of each command names every subcommand (nested ones included)
and every option; the bash completion script, sourced into a real bash,
completes subcommands and options.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("shtab", reason="the 'shell' extra (make install installs it)")
pytest.importorskip("build_manpages", reason="the 'shell' extra (make install installs it)")
sys.path.insert(0, str(ROOT / "tools"))
import shell_files  # noqa: E402

sys.path.remove(str(ROOT / "tools"))


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("share")
    shell_files.generate(out)
    return out


def _subcommands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, object]]:
    """Every (``"pciback ctl assign"``, its parser) below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _subcommands(sub, f"{prefix} {name}")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option but -h/--help (which every page has, and argparse-manpage leaves out)."""
    flags = {flag for action in parser._actions for flag in action.option_strings}
    return flags - {"-h", "--help"}


@pytest.mark.parametrize("command", ["pciback", "pcifront"])
def test_the_man_page_lists_every_subcommand_and_option(share: Path, command: str) -> None:
    page = (share / "man/man1" / f"{command}.1").read_text()
    assert page.startswith(f'.TH {command.upper()} "1" ')
    roff = page.replace("\\-", "-")
    parser = shell_files.COMMANDS[command]()
    subcommands = dict(_subcommands(parser, command))
    assert len(subcommands) >= 4
    for name, sub in subcommands.items():
        assert f".SH COMMAND \\fI\\,'{name}'\\/\\fR" in roff, name
        assert isinstance(sub, argparse.ArgumentParser)
        for flag in _options(sub):
            assert f"\\fB{flag}\\fR" in roff, (name, flag)


@pytest.mark.parametrize("command", ["pciback", "pcifront"])
def test_the_completion_scripts_are_written(share: Path, command: str) -> None:
    bash = (share / "bash-completion/completions" / command).read_text()
    zsh = (share / "zsh/site-functions" / f"_{command}").read_text()
    assert bash.rstrip().endswith(f"complete -o bashdefault -F _shtab_{command} {command}")
    assert zsh.startswith(f"#compdef {command}")


def _complete(share: Path, *words: str) -> list[str]:
    """What bash completes for ``words`` (the last one being typed)."""
    script = share / "bash-completion/completions" / words[0]
    line = " ".join(words)
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'; "
        f"COMP_POINT={len(line)}\n"
        f"_shtab_{words[0]} {words[0]} '{words[-1]}' '{words[-2]}'\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(
        ["bash", "--norc", "-c", program], capture_output=True, text=True, check=True, timeout=30
    )
    return sorted(filter(None, out.stdout.splitlines()))


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_subcommands_and_options(share: Path) -> None:
    assert _complete(share, "pciback", "") == ["check", "ctl", "serve", "show-default-config"]
    assert _complete(share, "pciback", "ctl", "un") == ["unassign", "unhide"]
    assert "--log-format" in _complete(share, "pciback", "serve", "--")
    assert {"lspci", "setpci", "mount", "agent"} <= set(_complete(share, "pcifront", ""))
