"""Loads the compiled ring extension, with instructions when it is missing."""

from __future__ import annotations

from typing import Any

__all__ = ["ffi", "lib"]

try:
    from shared.ring._ring_cffi import ffi as _ffi
    from shared.ring._ring_cffi import lib as _lib
except ImportError as exc:  # pragma: no cover - depends on the build state
    raise ImportError(
        "the shared-ring C extension shared.ring._ring_cffi is not built; run "
        "`pip install -e .` (or `python shared/ring/_build.py` to build it in place)"
    ) from exc

ffi: Any = _ffi
lib: Any = _lib
