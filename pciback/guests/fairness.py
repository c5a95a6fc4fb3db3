"""Fair turns between guests that are busy at the same time.

One trio loop serves every guest. When many guests pipeline requests at once,
trio wakes their sessions together and runs them in random order, each
answering a whole burst; a guest that sends one request now and then waits
behind a random share of everyone else's bursts. With 64 busy guests that was
13 times its latency alone (``docs/performance.md``).

:class:`FairTurns` orders the bursts by start-time fair queuing, and only when
it matters:

* **Uncontended** (the last two bursts served were this guest's own, and
  nobody waits) a session takes no turn at all: no checkpoint, no clock read.
  A single busy guest pays two method calls per burst.
* **Contended**, a session registers with a start tag ``max(V, F)``: ``V`` is
  the start tag of the burst served last, ``F`` this guest's own finish tag (its
  start tag plus the requests its last burst had). Sessions are served in order
  of start tag plus the size of their last burst (an estimate of this burst's
  finish), so among the many busy guests that share the current start tag, a
  guest with one request goes first. A session registers, then takes one
  checkpoint, so that every session woken in the same scheduler batch is
  registered before anyone is chosen. A guest that was quiet starts at ``V``
  with a small burst, so it goes next; busy guests alternate by how much they
  were served.
* **Advisory, never blocking**: a turn only orders. Sessions behind others
  wait their turn (a full round while many guests are busy: that is the
  sharing), but the first in line waits for the session holding the turn at
  most ``max_wait`` seconds of its hold and then goes ahead anyway (counted in
  :attr:`FairStatistics.waits_cut_short`), so a session that keeps its turn
  while it waits for something (a device lock) delays the others by at most
  that.
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

#: The longest a session waits for its turn before it goes ahead anyway (s).
DEFAULT_MAX_WAIT = 0.005


@dataclass
class FairStatistics:
    """How often turns were taken, and whether anyone had to wait too long."""

    #: Bursts served with a turn (the backend was contended).
    turns: int = 0
    #: Bursts served at once (no other guest was served recently).
    uncontended: int = 0
    #: Sessions that went ahead because the holder kept its turn over ``max_wait``.
    waits_cut_short: int = 0


class _Entry:
    __slots__ = ("finish", "key", "seq", "start", "task")

    def __init__(self, start: float, finish: float, seq: int, key: object) -> None:
        self.start = start
        #: The start tag plus the size of this guest's last burst: the order of service.
        self.finish = finish
        self.seq = seq
        self.key = key
        #: Set only while the session is parked waiting for its turn.
        self.task: trio.lowlevel.Task | None = None

    def __lt__(self, other: _Entry) -> bool:
        return (self.finish, self.seq) < (other.finish, other.seq)


class FairTurns:
    """Start-time fair queuing of request bursts, engaged only while guests compete.

    Each session calls :meth:`acquire` when a burst arrived and :meth:`release`
    with the number of requests it answered, before it sends the replies.
    ``key`` identifies the session (any hashable, compared by identity).
    """

    def __init__(
        self, *, max_wait: float = DEFAULT_MAX_WAIT
    ) -> None:
        if max_wait <= 0:
            raise ValueError(f"max_wait must be > 0, not {max_wait}")
        self.max_wait = max_wait
        self.stats = FairStatistics()
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._vtime = 0.0  # start tag of the burst served last
        self._finish: dict[object, float] = {}
        self._burst: dict[object, int] = {}  # each guest's last burst (requests)
        self._holder: object | None = None
        self._holder_start = 0.0
        self._held_since = 0.0
        # The guests whose bursts were served last and the one before.
        self._last_key: object | None = None
        self._prev_key: object | None = None

    def forget(self, key: object) -> None:
        """``key``'s session ended: drop its tag (its waits, if any, end by cancellation)."""
        self._finish.pop(key, None)
        self._burst.pop(key, None)
        if self._holder is key:
            self._holder = None
            self._wake_first()

    async def acquire(self, key: object) -> bool:
        """Wait for ``key``'s turn if other guests are busy. True if a turn was taken.

        A checkpoint only when contended; cancellation leaves no trace.
        """
        contended = (
            self._last_key is not key
            or self._prev_key is not key
            or self._holder is not None
            or bool(self._heap)
        )
        if not contended:
            self.stats.uncontended += 1
            return False
        start = max(self._vtime, self._finish.get(key, 0.0))
        entry = _Entry(start, start + self._burst.get(key, 1), next(self._seq), key)
        heapq.heappush(self._heap, entry)
        granted = False
        try:
            # Everyone woken in this scheduler batch registers before anyone is chosen.
            await trio.lowlevel.cancel_shielded_checkpoint()
            while not self._my_turn(entry):
                entry.task = trio.lowlevel.current_task()
                if self._heap[0] is entry:
                    # Next in line: wait for the holder, but never past max_wait of its
                    # hold (it may be waiting for something; the turn only orders).
                    with trio.move_on_at(self._held_since + self.max_wait) as waited:
                        await trio.lowlevel.wait_task_rescheduled(_abort_wait(entry))
                    if waited.cancelled_caught:
                        self.stats.waits_cut_short += 1
                        break
                else:
                    # Behind others: woken when we become the first (release or removal).
                    await trio.lowlevel.wait_task_rescheduled(_abort_wait(entry))
            granted = True
        finally:
            entry.task = None
            if granted:
                self._holder = key  # before leaving the queue: nobody else is woken for it
                self._held_since = trio.current_time()
            self._remove(entry)
        self._holder_start = entry.start
        self._vtime = max(self._vtime, entry.start)
        self.stats.turns += 1
        return True

    def release(self, key: object, served: int) -> None:
        """``key`` answered ``served`` requests (with or without a turn)."""
        self._burst[key] = max(served, 1)
        if self._holder is key:
            self._finish[key] = self._holder_start + max(served, 1)
            self._holder = None
            self._wake_first()
        else:
            self._finish[key] = max(self._vtime, self._finish.get(key, 0.0)) + max(served, 1)
        self._prev_key, self._last_key = self._last_key, key

    # -- internals ---------------------------------------------------------------------

    def _my_turn(self, entry: _Entry) -> bool:
        return self._holder is None and self._heap[0] is entry

    def _remove(self, entry: _Entry) -> None:
        try:
            self._heap.remove(entry)
        except ValueError:
            return
        heapq.heapify(self._heap)
        # The new first waits for the holder with a time limit, or takes a free turn.
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
