"""Every fenced code block in README.md and docs/*.md runs in ``make test``.

The rules users and authors rely on are written once, in ``docs/README.md``. In short:

- ```` ```python ```` blocks run (in order, sharing one namespace per document); a
  block that starts with ``>>>`` is a doctest, so its output is compared too;
- ```` ```toml ```` blocks are checked like ``pciback check`` does (keys, listen
  addresses, TLS files, dumps, host devices, policies); ``<!-- stand-ins: ... -->``
  names what the reader provides, made up for the check (``tests/docs/standins.py``);
- ```` ```console ```` blocks are shell sessions: each ``$ command`` runs with bash and
  its output must match the lines below it (``...`` matches anything);
  a command ending in ``&`` keeps running in the background until the document ends,
  and the lines below it are what it prints once it is ready;
- ``<!-- file: PATH -->`` on the line before a block writes the block to ``PATH``
  instead of running it (a later session uses it);
- ``<!-- not-runnable: REASON -->`` on the line before a block exempts it; the reason
  is required (``<!-- not-runnable-begin: REASON -->`` ... ``<!-- not-runnable-end -->``
  exempts every block between, e.g. generated ones);
- any other block (no language, ``sh``, ``text``, ...) without a marker fails.

All blocks of one document run in one scratch directory outside the repository,
which is the current directory for Python blocks and shell sessions alike. Shell
sessions find ``pciback``, ``pcifront``, ``python`` and ``pytest`` first on PATH in a
virtual environment where pcisplit is installed from its wheel (not editable), so
the documentation is checked against what users install.

This module is the sybil parser and its evaluators; ``tests/docs/plugin.py`` hands
it to pytest.
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sybil import Document, Example, Region, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown.lexers import FencedCodeBlockLexer

from tests.docs.standins import stand_ins

__all__ = ["make_sybil", "parse_session", "Command", "output_matches", "DOCS_STATE"]

#: The namespace key holding a document's :class:`DocRun`.
DOCS_STATE = "__docs_run__"
#: Markers: an HTML comment alone on its line, directly above the block it is about.
MARKER = re.compile(
    r"^[ \t]*<!--[ \t]*(not-runnable|file|stand-ins):[ \t]*(.*?)[ \t]*-->[ \t]*$", re.M
)
#: A range of blocks (e.g. generated ones) exempt for one reason.
RANGE = re.compile(
    r"^[ \t]*<!--[ \t]*not-runnable-begin:[ \t]*(.*?)[ \t]*-->[ \t]*$"
    r"(.*?)^[ \t]*<!--[ \t]*not-runnable-end[ \t]*-->",
    re.M | re.S,
)
RUNNABLE = ("python", "toml", "console")
#: How long one foreground command, or a background command's readiness, may take.
COMMAND_TIMEOUT = 120.0
READY_TIMEOUT = 60.0

_CHECKER = doctest.OutputChecker()
_FLAGS = doctest.ELLIPSIS


def output_matches(expected: str, got: str) -> bool:
    """doctest's comparison: exact, except that ``...`` matches any text (even lines).

    Trailing blank lines do not count (a Markdown block cannot show them).
    """
    expected, got = expected.rstrip("\n"), got.rstrip("\n")
    return _CHECKER.check_output(expected + "\n", got + "\n", _FLAGS) if expected else not got


@dataclass
class Command:
    """One ``$ command`` of a console session and the output the docs show for it."""

    line: int  # 1-based line in the document
    command: str
    expected: str = ""
    background: bool = False


def parse_session(text: str, first_line: int) -> list[Command]:
    """Split a console block into commands (``$ ``, with ``\\`` continuations) and output."""
    commands: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ ") or line == "$":
            parts = [line[2:]]
            start = i
            while parts[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                parts.append(lines[i])
            cmd = "\n".join(parts).rstrip()
            background = cmd.endswith("&") and not cmd.endswith("&&")
            if background:
                cmd = cmd[:-1].rstrip()
            commands.append(Command(first_line + start, cmd, background=background))
        elif not commands:
            raise ValueError(
                f"line {first_line + i}: a console block starts with a '$ ' command line"
            )
        else:
            commands[-1].expected += line + "\n"
        i += 1
    return commands


@dataclass
class Background:
    """A command started with ``&``: kept running until its document ends."""

    command: Command
    process: subprocess.Popen[bytes]
    output: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None

    def start_reader(self) -> None:
        def read() -> None:
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                with self.lock:
                    self.output.append(raw.decode(errors="replace"))

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def text(self) -> str:
        with self.lock:
            return "".join(self.output)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.reader is not None:
            self.reader.join(5)


@dataclass
class DocRun:
    """The state one document's blocks share: its scratch directory and background jobs."""

    scratch: Path
    old_cwd: Path
    background: list[Background] = field(default_factory=list)
    bin_dir: Path | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = self.bin_dir or Path(sys.executable).parent
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(bin_dir.parent)
        env.pop("PYTHONPATH", None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["COLUMNS"] = "80"
        return env


def _state(example: Example) -> DocRun:
    run = example.namespace[DOCS_STATE]
    assert isinstance(run, DocRun)
    installed = example.namespace.get("pcisplit_installed")
    if installed is not None:
        run.bin_dir = Path(installed.bin_dir)
    return run


# -- evaluators ---------------------------------------------------------------------------


def _failure(message: str) -> Callable[[Example], str]:
    def evaluate(example: Example) -> str:
        return message

    return evaluate


def _write_file(relpath: str) -> Callable[[Example], None]:
    def evaluate(example: Example) -> None:
        run = _state(example)
        target = (run.scratch / relpath).resolve()
        if run.scratch.resolve() not in target.parents:
            raise ValueError(f"file: {relpath!r} leaves the document's scratch directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(str(example.parsed))

    return evaluate


_python = PythonEvaluator()


def _run_python(example: Example) -> str | None:
    """Run a Python block; a block starting with ``>>>`` is a doctest (output compared)."""
    _state(example)
    source = str(example.parsed)
    if not source.lstrip().startswith(">>>"):
        _python(example)
        return None
    test = doctest.DocTestParser().get_doctest(
        source, example.namespace, str(example.path), str(example.path), example.line
    )
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    runner.run(test, out=out.append, clear_globs=False)
    test.globs.pop("__builtins__", None)
    example.namespace.update(test.globs)  # DocTest copies its globals; keep what it defined
    return "".join(out) if runner.failures else None


def _check_toml(words: list[str]) -> Callable[[Example], None]:
    """Check a config block the way ``pciback check`` does (``pciback.cli.check_config``).

    The block is written to the page's scratch directory, so relative paths
    find what earlier blocks made there; ``words`` are the stand-ins of its
    ``<!-- stand-ins: ... -->`` marker (see ``tests/docs/standins.py``).
    """

    def evaluate(example: Example) -> None:
        from pciback.cli import check_config

        run = _state(example)
        with stand_ins(str(example.parsed), words, run.scratch) as text:
            path = run.scratch / f".docs-check-line-{example.line}.toml"
            path.write_text(text)
            try:
                check_config(path)
            finally:
                path.unlink(missing_ok=True)

    return evaluate


def _run_console(example: Example) -> str | None:
    run = _state(example)
    commands = parse_session(str(example.parsed), example.line + 1)
    for cmd in commands:
        failure = _start_background(run, cmd) if cmd.background else _run_foreground(run, cmd)
        if failure:
            return failure
    return None


def _mismatch(cmd: Command, got: str, extra: str = "") -> str:
    return (
        f"line {cmd.line}: $ {cmd.command}{extra}\n"
        f"--- the docs show:\n{cmd.expected}--- the command printed:\n{got}"
    )


def _run_foreground(run: DocRun, cmd: Command) -> str | None:
    try:
        done = subprocess.run(
            ["bash", "-c", cmd.command],
            cwd=run.scratch,
            env=run.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        got = (exc.output or b"").decode(errors="replace")
        return _mismatch(cmd, got, f" (still running after {COMMAND_TIMEOUT:.0f} s)")
    got = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        return _mismatch(
            cmd,
            got,
            f" (exit status {done.returncode}; a session shows failing commands"
            ' as `$ command; echo "exit status $?"`)',
        )
    if not output_matches(cmd.expected, got):
        return _mismatch(cmd, got)
    return None


def _start_background(run: DocRun, cmd: Command) -> str | None:
    if not cmd.expected.strip():
        return (
            f"line {cmd.line}: a background command (ending in '&') must be followed by "
            "the output it prints once it is ready, so the session can wait for it"
        )
    process = subprocess.Popen(
        ["bash", "-c", "exec " + cmd.command],
        cwd=run.scratch,
        env=run.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    job = Background(cmd, process)
    run.background.append(job)
    job.start_reader()
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        got = job.text()
        if output_matches(cmd.expected, got):
            return None
        if process.poll() is not None and job.reader is not None:
            job.reader.join(5)
            got = job.text()
            if output_matches(cmd.expected, got):
                return None
            return _mismatch(cmd, got, f" (exited with status {process.returncode})")
        time.sleep(0.05)  # polling a real process's output; nothing to await here
    return _mismatch(cmd, job.text(), f" (not ready after {READY_TIMEOUT:.0f} s)")


# -- the parser ---------------------------------------------------------------------------


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def parse_document(document: Document) -> Iterator[Region]:
    """One region per fenced block (none for a block marked not-runnable)."""
    text = document.text
    markers = [(m.start(), m.end(), m.group(1), m.group(2)) for m in MARKER.finditer(text)]
    blocks = sorted(FencedCodeBlockLexer(".*")(document), key=lambda r: r.start)
    ranges = [(m.start(), m.end(), m.group(1)) for m in RANGE.finditer(text)]
    for start, _end, reason in ranges:
        if not reason:
            yield Region(
                start,
                start + 1,
                None,
                _failure(
                    f"line {_line_of(text, start)}: <!-- not-runnable-begin: --> needs a reason"
                ),
            )
    used: set[int] = set()
    for block in blocks:
        if any(start <= block.start < end for start, end, _reason in ranges):
            continue
        marker = next(
            (m for m in markers if m[1] <= block.start and not text[m[1] : block.start].strip()),
            None,
        )
        language = (block.lexemes["language"] or "").strip().split(" ")[0]
        where = f"line {_line_of(text, block.start)}"
        evaluator: Callable[[Example], Any]
        if marker is not None:
            used.add(marker[0])
            kind, argument = marker[2], marker[3]
            if not argument:
                evaluator = _failure(
                    f"{where}: <!-- {kind}: ... --> needs "
                    + {"not-runnable": "a reason", "file": "a path"}.get(kind, "a file or address")
                )
            elif kind == "not-runnable":
                continue
            elif kind == "stand-ins":
                evaluator = (
                    _check_toml(argument.split())
                    if language == "toml"
                    else _failure(f"{where}: <!-- stand-ins: --> is for ```toml blocks only")
                )
            else:
                evaluator = _write_file(argument)
        elif language == "python":
            evaluator = _run_python
        elif language == "toml":
            evaluator = _check_toml([])
        elif language == "console":
            evaluator = _run_console
        else:
            evaluator = _failure(
                f"{where}: a ```{language} block neither runs ({', '.join(RUNNABLE)}) nor is "
                "marked; put <!-- not-runnable: REASON --> on the line before it "
                "(see docs/README.md)"
            )
        yield Region(block.start, block.end, block.lexemes["source"], evaluator)
    for start, _end, kind, _argument in markers:
        if start not in used:
            yield Region(
                start,
                start + 1,
                None,
                _failure(
                    f"line {_line_of(text, start)}: <!-- {kind}: --> must sit directly above "
                    "the code block it is about"
                ),
            )


def _setup(namespace: dict[str, Any]) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="pcisplit-docs-"))
    namespace[DOCS_STATE] = DocRun(scratch=scratch, old_cwd=Path.cwd())
    os.chdir(scratch)


def _teardown(namespace: dict[str, Any]) -> None:
    run = namespace.get(DOCS_STATE)
    if not isinstance(run, DocRun):
        return
    try:
        for job in run.background:
            job.stop()
    finally:
        os.chdir(run.old_cwd)
        shutil.rmtree(run.scratch, ignore_errors=True)


def make_sybil(patterns: Iterable[str], root: Path, fixtures: Iterable[str] = ()) -> Sybil:
    """The sybil that checks the Markdown files matching ``patterns`` under ``root``."""
    return Sybil(
        parsers=[parse_document],
        patterns=list(patterns),
        path=str(root),
        setup=_setup,
        teardown=_teardown,
        fixtures=list(fixtures),
    )
