"""Reads and writes on peer-shared eventfds that cannot block the event loop.

A guest that passed us an eventfd shares its open file description, so it can
clear ``O_NONBLOCK`` under us at any time (and eventfd has no per-call
non-blocking flag). :func:`guarded_write` and :func:`guarded_read` call into C
(``guard.h``): a ``poll`` first answers "full" / "empty" without blocking, and
the call itself runs under a per-thread timer whose signal interrupts it after
:data:`GUARD_SECONDS`, however the guest toggles the flag. A guarded call that
had to be interrupted raises :class:`EventfdStalledError`: an honest peer never
causes one, so callers treat the fd as hostile (close it, or drop the peer).
"""

from __future__ import annotations

import errno
import os
from typing import Any

import trio

from shared.errors import PcisplitError

try:
    from shared.evtchn._guard_cffi import ffi as _ffi
    from shared.evtchn._guard_cffi import lib as _lib
except ImportError as exc:  # pragma: no cover - depends on the build state
    raise ImportError(
        "the guarded-I/O C extension shared.evtchn._guard_cffi is not built; run "
        "`pip install -e .` (or `python shared/evtchn/_build.py` to build it in place)"
    ) from exc

__all__ = ["EventfdStalledError", "GUARD_SECONDS", "guarded_write", "guarded_read"]

ffi: Any = _ffi
lib: Any = _lib

#: The longest one guarded call may block the calling thread (the event loop).
GUARD_SECONDS = 0.002
_GUARD_NS = int(GUARD_SECONDS * 1e9)
_U64 = 0xFFFF_FFFF_FFFF_FFFF


class EventfdStalledError(PcisplitError, trio.BrokenResourceError):
    """A peer-shared eventfd blocked a guarded call: the peer cleared O_NONBLOCK on it
    and filled (or drained) the counter. Close the fd; an honest peer never does this."""


def _check(result: int, fd: int, what: str) -> int:
    if result >= 0:
        return result
    code = -result
    if code == errno.ETIMEDOUT:
        raise EventfdStalledError(
            f"{what} on eventfd {fd} blocked for {GUARD_SECONDS * 1000:.0f} ms: the peer made "
            "the shared fd blocking and filled or drained its counter; the fd is now refused"
        )
    raise OSError(code, os.strerror(code))


def guarded_write(fd: int, value: int) -> bool:
    """Add ``value`` to eventfd ``fd``. False when the counter is full (nothing written).

    Raises :class:`EventfdStalledError` when the write blocked and was cut
    short, and :class:`OSError` for other failures (``EBADF``...).
    """
    if not 0 < value < _U64:
        raise ValueError(f"an eventfd increment must be in 1..2**64-2, not {value}")
    buf = ffi.new("uint64_t *", value)
    result = int(lib.pcisplit_guarded_write(fd, buf, 8, _GUARD_NS))
    if result == -errno.EAGAIN:
        return False
    _check(result, fd, "a write")
    return True


def guarded_read(fd: int) -> int:
    """Take eventfd ``fd``'s counter (0 when it is zero). Same errors as :func:`guarded_write`.

    One ``preadv2(RWF_NOWAIT)`` where the kernel supports it for ``fd`` (it never
    blocks, whatever the peer did to O_NONBLOCK); else the timer-guarded read.
    """
    buf = ffi.new("uint64_t *")
    result = int(lib.pcisplit_nowait_read(fd, buf, 8))
    if result == -errno.EOPNOTSUPP:
        result = int(lib.pcisplit_guarded_read(fd, buf, 8, _GUARD_NS))
    if result == -errno.EAGAIN:
        return 0
    _check(result, fd, "a read")
    return int(buf[0])
