"""Fair turns between guests that are busy at the same time.

One trio loop serves every guest. When many guests pipeline requests at once,
trio wakes their sessions together and runs them in random order, each
answering a whole burst; a guest that sends one request now and then waits
behind a random share of everyone else's bursts. With 64 busy guests that was
13 times its latency alone (``docs/performance.md``).

:class:`FairTurns` orders the bursts by start-time fair queuing, and only when
it matters:

* **Uncontended** (no other guest was served within ``window`` seconds) a
  session takes no turn at all: no checkpoint, no bookkeeping beyond one clock
  read. A single busy guest pays nothing.
* **Contended**, a session registers with a start tag ``max(V, F)``: ``V`` is
  the start tag of the burst served last, ``F`` this guest's own finish tag (its
  start tag plus the requests its last burst had). It then takes one
  checkpoint, so that every session woken in the same scheduler batch is
  registered before anyone is chosen, and waits until it has the smallest tag.
  A guest that was quiet starts at ``V``, so it goes next; busy guests
  alternate by how much they were served.
* **Advisory, never blocking**: a turn only orders. A session waits for its
  turn at most ``max_wait`` seconds and then goes ahead anyway (counted in
  :attr:`FairStatistics.waits_cut_short`), so a session that keeps its turn
  while it waits for something (a device lock) delays others by at most that.
  The turn covers reading and dispatching a burst, never sending its replies:
  a guest that does not read what we send cannot hold it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["FairStatistics", "FairTurns"]

#: Another guest served within this many seconds means the backend is contended.
DEFAULT_WINDOW = 0.002
#: The longest a session waits for its turn before it goes ahead anyway (s).
DEFAULT_MAX_WAIT = 0.005


@dataclass
class FairStatistics:
    """How often turns were taken, and whether anyone had to wait too long."""

    #: Bursts served with a turn (the backend was contended).
    turns: int = 0
    #: Bursts served at once (no other guest was served recently).
    uncontended: int = 0
    #: Sessions that went ahead after ``max_wait`` without their turn.
    waits_cut_short: int = 0


class _Entry:
    __slots__ = ("key", "seq", "start", "task")

    def __init__(self, start: float, seq: int, key: object) -> None:
        self.start = start
        self.seq = seq
        self.key = key
        #: Set only while the session is parked waiting for its turn.
        self.task: trio.lowlevel.Task | None = None

    def __lt__(self, other: _Entry) -> bool:
        return (self.start, self.seq) < (other.start, other.seq)


class FairTurns:
    """Start-time fair queuing of request bursts, engaged only while guests compete.

    Each session calls :meth:`acquire` when a burst arrived and :meth:`release`
    with the number of requests it answered, before it sends the replies.
    ``key`` identifies the session (any hashable, compared by identity).
    """

    def __init__(
        self, *, window: float = DEFAULT_WINDOW, max_wait: float = DEFAULT_MAX_WAIT
    ) -> None:
        if window < 0 or max_wait <= 0:
            raise ValueError(f"window must be >= 0 and max_wait > 0, not {window}, {max_wait}")
        self.window = window
        self.max_wait = max_wait
        self.stats = FairStatistics()
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._vtime = 0.0  # start tag of the burst served last
        self._finish: dict[object, float] = {}
        self._holder: object | None = None
        self._holder_start = 0.0
        # The guest served last and when; and when a different guest was served before it.
        self._last_key: object | None = None
        self._last_time = -float("inf")
        self._other_time = -float("inf")

    def forget(self, key: object) -> None:
        """``key``'s session ended: drop its tag (its waits, if any, end by cancellation)."""
        self._finish.pop(key, None)
        if self._holder is key:
            self._holder = None
            self._wake_first()

    async def acquire(self, key: object) -> bool:
        """Wait for ``key``'s turn if other guests are busy. True if a turn was taken.

        A checkpoint only when contended; cancellation leaves no trace.
        """
        now = trio.current_time()
        # When another guest was served last (or, if we were, before us).
        other = self._last_time if self._last_key is not key else self._other_time
        contended = self._holder is not None or bool(self._heap) or now - other <= self.window
        if not contended:
            self.stats.uncontended += 1
            return False
        start = max(self._vtime, self._finish.get(key, 0.0))
        entry = _Entry(start, next(self._seq), key)
        heapq.heappush(self._heap, entry)
        granted = False
        try:
            # Everyone woken in this scheduler batch registers before anyone is chosen.
            await trio.lowlevel.cancel_shielded_checkpoint()
            if not self._my_turn(entry):
                with trio.move_on_after(self.max_wait) as waited:
                    while not self._my_turn(entry):
                        entry.task = trio.lowlevel.current_task()
                        await trio.lowlevel.wait_task_rescheduled(_abort_wait(entry))
                if waited.cancelled_caught:
                    self.stats.waits_cut_short += 1
            granted = True
        finally:
            entry.task = None
            if granted:
                self._holder = key  # before leaving the queue: nobody else is woken for it
            self._remove(entry)
        self._holder_start = entry.start
        self._vtime = max(self._vtime, entry.start)
        self.stats.turns += 1
        return True

    def release(self, key: object, served: int) -> None:
        """``key`` answered ``served`` requests (with or without a turn)."""
        if self._holder is key:
            self._finish[key] = self._holder_start + max(served, 1)
            self._holder = None
            self._wake_first()
        else:
            self._finish[key] = max(self._vtime, self._finish.get(key, 0.0)) + max(served, 1)
        if key is not self._last_key:
            self._other_time = self._last_time  # the last time a guest other than key was
        self._last_key, self._last_time = key, trio.current_time()

    # -- internals ---------------------------------------------------------------------

    def _my_turn(self, entry: _Entry) -> bool:
        return self._holder is None and self._heap[0] is entry

    def _remove(self, entry: _Entry) -> None:
        try:
            self._heap.remove(entry)
        except ValueError:
            return
        heapq.heapify(self._heap)
        if self._holder is None:
            self._wake_first()

    def _wake_first(self) -> None:
        if self._heap:
            first = self._heap[0]
            task, first.task = first.task, None
            if task is not None:
                trio.lowlevel.reschedule(task)


def _abort_wait(entry: _Entry) -> Callable[[Callable[[], object]], trio.lowlevel.Abort]:
    def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
        entry.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    return abort
