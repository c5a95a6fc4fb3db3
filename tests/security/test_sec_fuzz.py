"""The atheris fuzz targets in ``fuzz/``: corpus and crash replay, and a short fuzzing smoke.

Replay needs no atheris: every seed (``fuzz/corpus/<target>``) and every input
that ever crashed a target (``fuzz/regressions/<target>``) goes through the
target's ``test_one_input`` on every ``make test``. The smoke fuzzes each
target for a moment with atheris (``make fuzz`` runs them for ``FUZZ_SECONDS``)
and skips, saying why, where atheris cannot be installed.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FUZZ = REPO / "fuzz"
sys.path.insert(0, str(FUZZ))

from _common import TARGETS, corpus_dir, regressions_dir  # noqa: E402

#: libFuzzer runs per target in the smoke: a few seconds each. The policy target builds and
#: compiles a device per input (~20 ms), so it gets fewer.
SMOKE_RUNS = {"frames": 2000, "codec": 2000, "ring": 2000, "caps": 2000, "policy": 40,
             "vfio_user": 2000}


def _inputs() -> list[tuple[str, Path]]:
    out = []
    for name in TARGETS:
        for folder in (corpus_dir(name), regressions_dir(name)):
            if folder.is_dir():
                out.extend((name, f) for f in sorted(folder.iterdir()) if f.is_file())
    return out


def test_every_target_has_seeds() -> None:
    for name in TARGETS:
        assert any(corpus_dir(name).iterdir()), f"fuzz/corpus/{name} is empty; run fuzz/seeds.py"


@pytest.mark.parametrize(
    ("target", "path"), _inputs(), ids=[f"{t}-{p.parent.name}-{p.name}" for t, p in _inputs()]
)
def test_replay(target: str, path: Path) -> None:
    module = importlib.import_module(f"fuzz_{target}")
    module.test_one_input(path.read_bytes())


def _atheris_problem() -> str | None:
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        return (
            f"atheris is not installed here ({exc}); `make install` installs the 'fuzz' extra "
            "where a wheel exists (CPython 3.8-3.11 on x86_64 Linux) or clang can build it"
        )
    return None


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_smoke(target: str, tmp_path: Path) -> None:
    problem = _atheris_problem()
    if problem:
        pytest.skip(problem)
    (tmp_path / "work").mkdir()
    runs = SMOKE_RUNS[target]
    proc = subprocess.run(
        [
            sys.executable,
            str(FUZZ / f"fuzz_{target}.py"),
            f"-runs={runs}",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path / "work"),
            str(corpus_dir(target)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0, f"fuzz_{target} crashed:\n{tail}"
    assert f"Done {runs} runs" in proc.stderr, tail
