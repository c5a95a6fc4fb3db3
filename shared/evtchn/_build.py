"""cffi build script for the guarded eventfd I/O (API mode), like ``shared/ring/_build.py``.

``setup.py`` names ``shared/evtchn/_build.py:ffibuilder`` in ``cffi_modules``,
so ``pip install -e .`` compiles ``shared.evtchn._guard_cffi``. Without
installing, ``python shared/evtchn/_build.py`` builds it in place. The C code
lives in ``guard.h`` only; the ``BEGIN CDEF``/``END CDEF`` part is what Python sees.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

from cffi import FFI

__all__ = ["ffibuilder", "build_in_place"]

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "guard.h"
MODULE = "shared.evtchn._guard_cffi"


def _make_builder() -> FFI:
    header = HEADER.read_text(encoding="utf-8")
    begin = header.index("/* BEGIN CDEF */") + len("/* BEGIN CDEF */")
    builder = FFI()
    builder.cdef(header[begin : header.index("/* END CDEF */")])
    # Embedded rather than #included: setuptools builds from a temporary directory.
    builder.set_source(MODULE, header, extra_compile_args=["-O2", "-std=gnu11"], libraries=["rt"])
    return builder


ffibuilder = _make_builder()


def build_in_place() -> pathlib.Path:
    """Compile the extension and copy it into ``shared/evtchn/``; return its path."""
    with tempfile.TemporaryDirectory(prefix="pcisplit-guard-") as tmp:
        built = pathlib.Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        target = HERE / built.name
        shutil.copy2(built, target)
    return target


if __name__ == "__main__":
    sys.stdout.write(f"built {build_in_place()}\n")
