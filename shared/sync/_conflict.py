"""One rule for resources that allow one user at a time: a second one is a bug.

A frame transport allows one task sending and one receiving at a time, an
event-channel port one waiter. A second task that tries while the first is
inside has a bug, and gets :class:`trio.BusyResourceError` at once rather
than interleaved frames. trio keeps this rule in a small ``ConflictDetector``
(``with self._send_conflict_detector:``); ours are the same, in two flavours
that share the rule and the error:

* :class:`ConflictDetector`, for trio tasks (one thread): a flag.
* :class:`ThreadConflictDetector`, for threads (the blocking transports):
  the same rule made atomic with a non-blocking lock, so two threads can
  never both get in.

``with detector:`` claims the resource for the block and raises
:class:`trio.BusyResourceError` (with the detector's message) if it is held
already; :attr:`held` says whether someone is inside, for code that only
needs to know (a ``receive_frame_nowait`` that returns None while a receive
runs).

The request hot path
--------------------
Entering and leaving a ``with`` block are two Python calls, and the QD1
request path is counted in Python calls (``docs/performance.md``): with the
detector on every send, receive and doorbell wait it cost 13 more calls per
``shm:`` round trip (405 to 418, both ends). There, and only there, the
transports spell out what ``__enter__`` and ``__exit__`` do, on the
detector's own fields, which costs what the old inline flags cost::

    receiving = self._receive_conflicts
    if receiving.held:
        raise receiving.error()
    receiving.held = True
    try:
        ...
    finally:
        receiving.held = False

The rule, its error and its message stay the detector's; the conformance
kits (``shared.transport.conformance``, ``blocking_conformance``) check every
transport for it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from types import TracebackType

import trio

__all__ = ["ConflictDetector", "ThreadConflictDetector"]


class ConflictDetector:
    """Detects a second task using a resource that allows one at a time.

    ``message`` says what the second task tried, for its
    :class:`trio.BusyResourceError` (for example "another task is already
    sending on this transport").
    """

    __slots__ = ("held", "message")

    def __init__(self, message: str) -> None:
        self.message = message
        #: True while a task is inside ``with detector:``.
        self.held = False

    def error(self) -> trio.BusyResourceError:
        """The error for a second user: :class:`trio.BusyResourceError` with :attr:`message`."""
        return trio.BusyResourceError(self.message)

    def __enter__(self) -> None:
        if self.held:
            raise self.error()
        self.held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.held = False

    def __repr__(self) -> str:
        return f"<ConflictDetector {'held' if self.held else 'free'}: {self.message!r}>"


class ThreadConflictDetector:
    """:class:`ConflictDetector` for threads: the check and the claim are one atomic step.

    :meth:`claim` and :meth:`release` are the spelled-out ``__enter__`` and
    ``__exit__`` for the blocking transports' request path; both are C calls
    (a non-blocking ``threading.Lock`` acquire and its release)::

        if not detector.claim():
            raise detector.error()
        try:
            ...
        finally:
            detector.release()
    """

    __slots__ = ("_lock", "claim", "message", "release")

    def __init__(self, message: str) -> None:
        self.message = message
        self._lock = lock = threading.Lock()
        #: Take the resource if it is free, in one atomic step; False if a thread has it.
        self.claim: Callable[[], bool] = functools.partial(lock.acquire, False)
        #: Give the resource back after a successful :attr:`claim`.
        self.release: Callable[[], None] = lock.release

    @property
    def held(self) -> bool:
        """True while a thread is inside ``with detector:`` (or between claim and release)."""
        return self._lock.locked()

    def error(self) -> trio.BusyResourceError:
        """The error for a second user: :class:`trio.BusyResourceError` with :attr:`message`."""
        return trio.BusyResourceError(self.message)

    def __enter__(self) -> None:
        if not self.claim():
            raise self.error()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<ThreadConflictDetector {'held' if self.held else 'free'}: {self.message!r}>"
