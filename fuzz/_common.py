"""What every fuzz target shares: the atheris entry point and the list of targets.

A target is a module ``fuzz/fuzz_<name>.py`` with ``test_one_input(data: bytes)``.
It imports no atheris, so pytest can replay its corpus and regression inputs on
any machine; :func:`run` imports atheris only to fuzz. A target raises only for
a real bug: typed errors the code under test is *supposed* to raise for hostile
input are caught inside the target, anything else escapes and is a crash.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent

#: Target names, in the order ``make fuzz`` runs them.
TARGETS = ("frames", "codec", "ring", "caps", "policy", "vfio_user")


def corpus_dir(name: str) -> Path:
    """Seed inputs (checked in) for target ``name``; libFuzzer adds what it finds."""
    return FUZZ_DIR / "corpus" / name


def regressions_dir(name: str) -> Path:
    """Inputs that once crashed target ``name``: replayed by pytest forever."""
    return FUZZ_DIR / "regressions" / name


def instrumented(module_name: str, packages: Sequence[str]) -> AbstractContextManager[object]:
    """Wrap a target's imports: coverage instrumentation of ``packages`` when fuzzing.

    Only when the target runs as a script (``module_name == "__main__"``), so that
    replaying inputs under pytest needs no atheris. Instrumenting just the code
    under test (not trio, msgpack, ...) keeps start-up to a second or two.
    """
    if module_name != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=list(packages))  # type: ignore[no-any-return]


def run(test_one_input: Callable[[bytes], None]) -> None:
    """Fuzz ``test_one_input`` with atheris (libFuzzer flags come from ``sys.argv``)."""
    import atheris  # only here: replaying inputs must not need atheris

    # Rate-limited audit and warning logs would only slow the fuzzer down.
    logging.disable(logging.CRITICAL)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
