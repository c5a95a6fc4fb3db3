"""An event-channel port on a Linux eventfd, for peers on the same host.

The eventfd's kernel counter *is* the pending bit: writes add to it, one read
takes all of them (the coalescing is the kernel's), and ``poll`` reports it
readable while non-zero. Both processes hold the same eventfd (passed by
SCM_RIGHTS or inheritance); one notifies, the other waits.

Like trio's ``_unix_pipes.FdStream``, OS errors become trio errors: EBADF
means the fd was closed under us (:class:`trio.ClosedResourceError`), any
other failure is a :class:`trio.BrokenResourceError` naming the errno.

The peer shares the fd's open file description and so its ``O_NONBLOCK``
flag: every read and write goes through :mod:`shared.evtchn._guard`, which
cannot block for more than a couple of milliseconds whatever the peer does,
and raises :class:`~shared.evtchn.EventfdStalledError` (a
``BrokenResourceError``) when the peer tried.
"""

from __future__ import annotations

import errno
import os

import trio

from shared.evtchn._guard import guarded_read, guarded_write
from shared.evtchn._port import Port

__all__ = ["EventfdPort"]

# A peer can push the counter to its maximum; our write then fails with EAGAIN,
# which only means "already pending", so it coalesces instead of failing.
_EVENTFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


def _translate(
    exc: OSError, what: str
) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError(f"eventfd closed during {what}")
    return trio.BrokenResourceError(f"eventfd {what} failed: {exc.strerror or exc}")


class EventfdPort(Port):
    """A port on eventfd ``fd`` (made non-blocking here). ``owns_fd``: close it on close."""

    def __init__(self, fd: int, *, owns_fd: bool = True) -> None:
        super().__init__()
        if fd < 0:
            raise ValueError(f"eventfd file descriptor {fd} is invalid")
        self._fd = fd
        self._owns_fd = owns_fd
        try:
            os.set_blocking(fd, False)
        except OSError as exc:
            raise _translate(exc, "setup") from exc

    @classmethod
    def create(cls) -> EventfdPort:
        """A new eventfd (non-blocking, close-on-exec), owned by the port."""
        return cls(os.eventfd(0, _EVENTFD_FLAGS))

    def fileno(self) -> int:
        """The eventfd, for passing it to the peer (SCM_RIGHTS or ``pass_fds``)."""
        if self._closed:
            raise trio.ClosedResourceError("this eventfd port was closed")
        return self._fd

    def _send(self) -> bool:
        try:
            return guarded_write(self._fd, 1)
        except OSError as exc:
            raise _translate(exc, "notify") from exc

    def _collect(self) -> int:
        try:
            return guarded_read(self._fd)
        except OSError as exc:
            raise _translate(exc, "read") from exc

    async def _wait_arrival(self) -> None:
        # Level-triggered: returns at once if the counter is already non-zero.
        await trio.lowlevel.wait_readable(self._fd)

    def _close_resources(self) -> None:
        if not self._owns_fd:
            return
        fd, self._fd = self._fd, -1
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:
            pass  # outside trio.run nobody can be waiting on the fd
        os.close(fd)
