"""Two parts of the ``shm:`` transport that each keep their own state.

* :class:`Doorbell`: sleeping on our doorbell, one sleeper at a time with the
  others parked behind it, and waking it without a cancel scope.
* :class:`RingFds`: the file descriptors the peer announced on the control
  socket for ring frames (``FDS seq``), tied to their frame when it is
  received (see ``_shm``'s module docstring for the exchange).

Split out of ``_shm.py``, whose :class:`~shared.transport._shm.ShmTransport`
owns one of each.
"""

from __future__ import annotations

import trio

from shared.errors import LimitExceededError
from shared.evtchn import EventfdPort
from shared.transport._shm_setup import _MAX_FD_BATCHES, _close_fds

__all__ = ["Doorbell", "RingFds"]


class Doorbell:
    """Our doorbell's sleeper, and the tasks parked behind it.

    One doorbell serves both "data arrived" and "space freed", so one task
    (the leader) waits on the eventfd and wakes the others when it returns.
    Every caller re-checks its own condition afterwards.
    """

    __slots__ = ("_followers", "_lot", "_woken", "sleeping", "sleeps")

    def __init__(self) -> None:
        #: True while the leader sleeps on the eventfd.
        self.sleeping = False
        #: Real sleeps so far (``ShmStatistics.doorbell_sleeps``).
        self.sleeps = 0
        # Set when wake() woke the sleeper through notify_closing.
        self._woken = False
        self._lot = trio.lowlevel.ParkingLot()
        self._followers = 0  # tasks parked in _lot

    async def wait(self, port: EventfdPort) -> None:
        """Sleep until ``port`` (our doorbell) rings, or :meth:`wake` is called."""
        if self.sleeping:
            self._followers += 1
            try:
                await self._lot.park()
            finally:
                self._followers -= 1
            return
        self.sleeping = True
        self.sleeps += 1
        try:
            await port.wait()
        except trio.ClosedResourceError:
            if not self._woken:
                raise  # the port itself was closed
        finally:
            self._woken = False
            self.sleeping = False
            if self._followers:  # usually none: skip the lot's bookkeeping
                self._lot.unpark_all()

    def wake(self, port: EventfdPort | None) -> None:
        """Wake the sleeper (on ``port``, if it is still open) and every task behind it."""
        if self.sleeping and port is not None and not port.closed:
            # Wake the doorbell sleeper without a cancel scope around every sleep (one
            # costs as much as a scheduler pass): notify_closing makes its
            # wait_readable raise ClosedResourceError, which wait() turns back into
            # a plain wake-up. The fd stays open and is waited on again.
            self._woken = True
            trio.lowlevel.notify_closing(port.fileno())
        self._lot.unpark_all()


class RingFds:
    """The fds the peer announced for ring frames, and those of the frame returned last.

    ``active`` is the one flag the receive path tests per frame: true only
    while some fds are announced or held.
    """

    __slots__ = ("_batches", "_current", "_max_fds", "active")

    def __init__(self, max_fds: int) -> None:
        self._max_fds = max_fds
        self._batches: dict[int, list[int]] = {}  # announced for ring frame `seq`
        self._current: list[int] = []  # tied to the frame returned last; closed at the next
        self.active = False

    def take(self) -> list[int]:
        """The fds of the frame returned last; the caller owns them."""
        fds, self._current = self._current, []
        self.active = bool(self._batches)
        return fds

    def tie(self, seq: int) -> None:
        """Ring frame ``seq`` was returned: close untaken fds, attach any announced for it."""
        if self._current:
            _close_fds(self._current)
        batches = self._batches
        self._current = batches.pop(seq, [])
        for stale in [s for s in batches if s < seq]:
            # Announced for a frame that has passed: an honest peer never does this.
            _close_fds(batches.pop(stale))
        self.active = bool(batches or self._current)

    def file(
        self, seq: int, fds: list[int], frames_received: int
    ) -> tuple[str, LimitExceededError | None] | None:
        """File the ``fds`` announced for ring frame ``seq``; None when they were accepted.

        Otherwise the fds are closed and the answer is why the peer must be
        dropped, with the limit it went over if that was it.
        """
        batches = self._batches
        if seq < frames_received or seq in batches or len(batches) >= _MAX_FD_BATCHES:
            _close_fds(fds)
            return (
                f"peer announced file descriptors for ring frame {seq}, which is already "
                f"received, announced twice or too far ahead ({len(batches)} pending)"
            ), None
        held = len(fds) + len(self._current) + sum(len(batch) for batch in batches.values())
        if held > self._max_fds:
            _close_fds(fds)
            problem = (
                f"peer announced file descriptors that would make us hold {held}, over the "
                f"limit of {self._max_fds} per connection (limits.max_fds_per_connection)"
            )
            return problem, LimitExceededError("max_fds_per_connection", problem)
        batches[seq] = fds
        self.active = True
        return None

    def close(self) -> None:
        """Close every fd held: untaken ones and ones announced for frames not yet received."""
        _close_fds(self._current)
        self._current = []
        for batch in self._batches.values():
            _close_fds(batch)
        self._batches.clear()
        self.active = False
