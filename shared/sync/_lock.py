"""A lock that costs no scheduler pass when it is free.

``trio.Lock.acquire`` always checkpoints, which is a full pass through the
run loop (about 5 µs on our VMs). On the request hot path the locks (one
send path per connection, one lock per device) are nearly always free, so
the checkpoint would be pure overhead. :class:`FastLock` takes a free lock
with two attribute writes and parks only when it is held; ``release`` hands
the lock directly to the first waiter (FIFO, like ``trio.Lock``), so a
stream of newcomers cannot starve a waiting task.

Because acquiring a free lock is not a checkpoint, a loop that only ever
takes free locks never yields: callers on a hot path must checkpoint
elsewhere (every transport send or receive does).
"""

from __future__ import annotations

from types import TracebackType

import trio

__all__ = ["FastLock"]


class FastLock:
    """A FIFO lock; :meth:`acquire` takes no checkpoint when the lock is free."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        """True while some task holds the lock."""
        return self._held

    def acquire_nowait(self) -> None:
        """Take the lock now, or raise :class:`trio.WouldBlock` if it is held."""
        if self._held:
            raise trio.WouldBlock
        self._held = True

    async def acquire(self) -> None:
        """Take the lock; parks (a cancellation point) only while another task holds it."""
        if not self._held:
            self._held = True
            return
        # release() hands the lock over while rescheduling us: when park() returns we own
        # it. If we are cancelled instead, we were removed from the lot and own nothing.
        await self._waiters.park()

    def release(self) -> None:
        """Release the lock, handing it to the longest waiter if there is one."""
        if not self._held:
            raise RuntimeError("FastLock.release() called while the lock is not held")
        if self._waiters:
            self._waiters.unpark()  # the lock stays held: it now belongs to that waiter
        else:
            self._held = False

    def statistics(self) -> trio.lowlevel.ParkingLotStatistics:
        """How many tasks wait (``tasks_waiting``)."""
        return self._waiters.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "locked" if self._held else "unlocked"
        return f"<FastLock {state}, {len(self._waiters)} waiting>"
