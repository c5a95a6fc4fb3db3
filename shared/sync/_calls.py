"""Outstanding calls by id: bounded slots, waiting for a result, failing them all.

The frontend's requests (ids from ``Connection.next_request_id``, answered by
replies) and the backend's DMA calls (ids from ``Connection.next_call_id``,
answered by ``DmaCallResult``) both need the same bookkeeping:

* a caller waits for a free slot while the peer's in-flight limit is reached
  (``full()`` asks the :class:`~shared.protocol.Connection`, which counts an
  id until the peer answers it, also when its caller has given up);
* it registers its id, sends, and waits for the result;
* the task that receives routes each result to its caller (:meth:`resolve`),
  which also frees a slot; a result nobody waits for any more is "late";
* a watchdog may complete a call early with a time-out result;
* when the connection ends every waiter wakes at once (:meth:`fail_all`).

Waiting parks the task directly (``wait_task_rescheduled``) rather than on a
``trio.Event`` per call: a call costs one small object, and waking it is one
``reschedule``. :meth:`wake` lets the receive side hand a waiting caller
something other than its result (the frontend hands over the right to read
the transport this way, see ``pcifront.client.pump``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import trio

__all__ = ["Call", "CallTable"]

R = TypeVar("R")


class Call(Generic[R]):
    """One outstanding call. ``result`` is None until it is resolved or completed."""

    __slots__ = ("_task", "id", "result", "started")

    def __init__(self, call_id: int, started: float) -> None:
        self.id = call_id
        self.result: R | None = None
        #: When the call was opened (``trio.current_time()``), for watchdogs.
        self.started = started
        self._task: trio.lowlevel.Task | None = None

    @property
    def waiting(self) -> bool:
        """True while the caller is parked in :meth:`CallTable.wait`."""
        return self._task is not None

    def __repr__(self) -> str:
        state = "done" if self.result is not None else "open"
        return f"<Call {self.id} {state}>"


def _abort(call: Call[object]) -> Callable[[Callable[[], object]], trio.lowlevel.Abort]:
    def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
        call._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    return abort


class CallTable(Generic[R]):
    """Calls awaiting results, by id. ``full()`` says whether the peer's limit is reached."""

    __slots__ = ("_calls", "_full", "_slots", "failed")

    def __init__(self, full: Callable[[], bool]) -> None:
        self._calls: dict[int, Call[R]] = {}
        self._full = full
        self._slots = trio.lowlevel.ParkingLot()
        #: Why every call failed (the connection ended), or None.
        self.failed: str | None = None

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[Call[R]]:
        return iter(list(self._calls.values()))

    def get(self, call_id: int) -> Call[R] | None:
        return self._calls.get(call_id)

    async def wait_slot(self) -> None:
        """Park while the peer's in-flight limit is reached; no checkpoint when there is room.

        Returns at once after :meth:`fail_all`; the caller checks :attr:`failed`.
        """
        while self._full() and self.failed is None:
            await self._slots.park()

    def open(self, call_id: int, started: float = 0.0) -> Call[R]:
        """Register ``call_id`` (fresh from the Connection) before its request is sent."""
        if call_id in self._calls:
            raise RuntimeError(f"call id {call_id} is already registered")
        call: Call[R] = Call(call_id, started)
        self._calls[call_id] = call
        return call

    def close(self, call: Call[R]) -> None:
        """The caller is done with ``call`` (it has its result, timed out or was cancelled)."""
        if self._calls.get(call.id) is call:
            del self._calls[call.id]
        call._task = None

    def resolve(self, call_id: int, result: R) -> Call[R] | None:
        """The peer answered ``call_id``: hand ``result`` to its caller and free a slot.

        Returns the call, or None when nobody waits for it any more (a late result:
        its caller timed out or was cancelled).
        """
        if self._slots:
            self._slots.unpark()
        call = self._calls.get(call_id)
        if call is None or call.result is not None:
            return None
        call.result = result
        self.wake(call)
        return call

    def complete(self, call: Call[R], result: R) -> None:
        """Finish ``call`` early with ``result`` (a watchdog's time-out); the id stays counted."""
        if call.result is None:
            call.result = result
            self.wake(call)

    @staticmethod
    def wake(call: Call[R]) -> None:
        """Reschedule ``call``'s caller if it is parked in :meth:`wait` (else nothing)."""
        task, call._task = call._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self, call: Call[R]) -> None:
        """Park until ``call`` has a result, someone :meth:`wake`\\ s it, or all calls fail.

        A cancellation point. Returns without parking (and without a checkpoint)
        when there is already a result or the table failed.
        """
        if call.result is not None or self.failed is not None:
            return
        call._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(_abort(call))  # type: ignore[arg-type]

    def fail_all(self, reason: str) -> None:
        """The connection ended: wake every caller and slot waiter. The first reason sticks."""
        if self.failed is None:
            self.failed = reason
        for call in list(self._calls.values()):
            self.wake(call)
        self._slots.unpark_all()
