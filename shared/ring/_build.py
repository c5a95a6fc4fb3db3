"""cffi build script for the shared ring (API mode).

``setup.py`` names ``shared/ring/_build.py:ffibuilder`` in ``cffi_modules``, so
``pip install .`` / ``pip install -e .`` compile ``shared.ring._ring_cffi``.
For development without installing, run ``python shared/ring/_build.py``: it
compiles the extension and places it next to this file.

The C layout and helpers live in ``ring.h`` only; the part between the
``BEGIN CDEF`` / ``END CDEF`` markers is what Python sees through cffi.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

from cffi import FFI

__all__ = ["ffibuilder", "build_in_place"]

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "ring.h"
MODULE = "shared.ring._ring_cffi"


def _cdef_text(header: str) -> str:
    begin = header.index("/* BEGIN CDEF */") + len("/* BEGIN CDEF */")
    end = header.index("/* END CDEF */")
    return header[begin:end]


def _make_builder() -> FFI:
    header = HEADER.read_text(encoding="utf-8")
    builder = FFI()
    builder.cdef(_cdef_text(header))
    # The header is embedded rather than #included so the build needs no include path
    # (setuptools runs it from a temporary directory during pip install).
    builder.set_source(MODULE, header, extra_compile_args=["-O2", "-std=gnu11"])
    return builder


ffibuilder = _make_builder()


def build_in_place() -> pathlib.Path:
    """Compile the extension and copy it into ``shared/ring/``; return its path."""
    with tempfile.TemporaryDirectory(prefix="pcisplit-ring-") as tmp:
        built = pathlib.Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        target = HERE / built.name
        shutil.copy2(built, target)
    return target


if __name__ == "__main__":
    path = build_in_place()
    sys.stdout.write(f"built {path}\n")
