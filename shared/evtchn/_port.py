"""Event-channel ports: the doorbell and interrupt primitive, modelled on Xen.

A port carries "something happened" signals, never data. A notification sets
the receiving port's *pending* bit; notifications that arrive while it is
already pending coalesce into one, exactly like a Xen event channel (and like
an eventfd counter). ``await wait()`` returns once per pending bit and clears
it. A *masked* port still records arrivals but wakes nobody until unmasked.

Implementations differ only in how a signal travels: :class:`InMemoryPort`
(tests, one process), :class:`InbandPort` (a notification frame over any frame
transport) and :class:`~shared.evtchn.EventfdPort` (Linux eventfd, same host).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from shared.sync import ConflictDetector

__all__ = ["Port", "PortStatistics", "InMemoryPort", "InbandPort"]


@dataclass(frozen=True, slots=True)
class PortStatistics:
    """Counters of one port (see :meth:`Port.statistics`).

    ``sent``: signals this end actually sent to its peer. ``received``: signals
    that arrived here. ``coalesced``: signals merged into one already pending
    (arrivals while pending, and for in-band ports also notifies merged into a
    send not yet made). ``wakeups``: times :meth:`Port.wait` returned.
    """

    sent: int
    received: int
    coalesced: int
    wakeups: int
    pending: bool
    masked: bool


class Port(abc.ABC):
    """One end of an event channel.

    Subclasses implement three hooks: ``_send`` (signal the peer), ``_collect``
    (take arrived signals without blocking) and ``_wait_arrival`` (sleep until
    ``_collect`` may find one; return at once if one is there already).
    """

    def __init__(self) -> None:
        self._pending = False
        self._masked = False
        self._closed = False
        self._waiters = ConflictDetector("another task is already waiting on this port")
        self._sent = 0
        self._received = 0
        self._coalesced = 0
        self._wakeups = 0
        self._unmask_lot = trio.lowlevel.ParkingLot()

    # ------------------------------------------------------------- hooks
    @abc.abstractmethod
    def _send(self) -> bool:
        """Signal the peer. False if the signal merged into one already on its way."""

    @abc.abstractmethod
    def _collect(self) -> int:
        """Take the signals that arrived since the last call; never blocks."""

    @abc.abstractmethod
    async def _wait_arrival(self) -> None:
        """Sleep until a signal may have arrived (or the port closed)."""

    @abc.abstractmethod
    def _close_resources(self) -> None:
        """Release what the implementation holds (fds, waiters). Called once."""

    # ------------------------------------------------------------- public API
    def notify(self) -> bool:
        """Signal the peer. Never blocks; repeated signals may coalesce.

        Returns True when a signal went out, False when it merged into one
        already pending (for an eventfd: the peer's counter was full).
        """
        if self._closed:
            raise trio.ClosedResourceError("this event-channel port was closed")
        if self._send():
            self._sent += 1
            return True
        self._coalesced += 1
        return False

    def _absorb(self, arrived: int) -> None:
        if arrived:
            self._received += arrived
            # Everything beyond the first arrival, or all of it if a signal is
            # already pending, merges into the one pending bit.
            self._coalesced += arrived if self._pending else arrived - 1
            self._pending = True

    @property
    def pending(self) -> bool:
        """True while a signal has arrived that no :meth:`wait` has taken yet."""
        if not self._closed:
            self._absorb(self._collect())
        return self._pending

    @property
    def masked(self) -> bool:
        return self._masked

    @property
    def closed(self) -> bool:
        return self._closed

    def mask(self) -> None:
        """Stop waking waiters. Arrivals still set the pending bit."""
        self._masked = True

    def unmask(self) -> None:
        """Wake waiters again; a signal that arrived while masked is delivered now."""
        self._masked = False
        self._unmask_lot.unpark_all()

    async def wait(self) -> None:
        """Wait until a signal is pending and the port unmasked, then clear the bit.

        Raises :class:`trio.ClosedResourceError` if the port is (or gets)
        closed, and :class:`trio.BusyResourceError` if another task is waiting.
        """
        # The doorbell sleep of the request path: the detector's enter and exit spelled
        # out (a with block would be two Python calls per sleep; shared/sync/_conflict.py).
        waiters = self._waiters
        if waiters.held:
            raise waiters.error()
        waiters.held = True
        blocked = False
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this event-channel port was closed")
                if self._masked:
                    blocked = True
                    await self._unmask_lot.park()
                    continue
                if self._pending:
                    self._pending = False
                    self._wakeups += 1
                    if not blocked:
                        # Returning without ever sleeping: still be a full checkpoint.
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return
                blocked = True
                await self._wait_arrival()
                if not self._closed:
                    self._absorb(self._collect())
        finally:
            waiters.held = False

    def statistics(self) -> PortStatistics:
        """Counters of notifications sent, received, coalesced and wake-ups."""
        return PortStatistics(
            sent=self._sent,
            received=self._received,
            coalesced=self._coalesced,
            wakeups=self._wakeups,
            pending=self._pending,
            masked=self._masked,
        )

    def close(self) -> None:
        """Close the port. Idempotent. Waiters get :class:`trio.ClosedResourceError`."""
        if self._closed:
            return
        self._closed = True
        self._unmask_lot.unpark_all()
        self._close_resources()

    async def aclose(self) -> None:
        """Async form of :meth:`close` (trio's resource convention)."""
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Port:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _QueuedArrivals(Port):
    """A port whose arrivals are counted in process (in-memory and in-band)."""

    def __init__(self) -> None:
        super().__init__()
        self._incoming = 0
        self._arrival_lot = trio.lowlevel.ParkingLot()

    def _arrive(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this event-channel port was closed")
        self._incoming += 1
        self._arrival_lot.unpark_all()

    def _collect(self) -> int:
        arrived, self._incoming = self._incoming, 0
        return arrived

    async def _wait_arrival(self) -> None:
        if self._incoming == 0 and not self._closed:
            await self._arrival_lot.park()

    def _close_resources(self) -> None:
        self._arrival_lot.unpark_all()


class InMemoryPort(_QueuedArrivals):
    """A port connected to another in the same process. Make them with :meth:`pair`."""

    def __init__(self) -> None:
        super().__init__()
        self._peer: InMemoryPort | None = None

    @classmethod
    def pair(cls) -> tuple[InMemoryPort, InMemoryPort]:
        """Two connected ports: ``a.notify()`` makes ``b`` pending, and back."""
        a, b = cls(), cls()
        a._peer, b._peer = b, a
        return a, b

    def _send(self) -> bool:
        peer = self._peer
        if peer is None:
            raise trio.BrokenResourceError("this in-memory port was never paired")
        if peer.closed:
            raise trio.BrokenResourceError("the peer port was closed")
        peer._arrive()
        return True


class InbandPort(_QueuedArrivals):
    """A port whose signals travel as messages over some frame transport.

    ``send`` is an async callable that sends one notification message (the
    owner decides its format). :meth:`run` must run in a nursery: it performs
    the sends, so :meth:`notify` stays synchronous and never blocks. Notifies
    made before a send starts merge into it. The receiving side calls
    :meth:`deliver` for each notification message it takes off its transport.
    """

    def __init__(self, send: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self._send_fn = send
        self._outgoing = False
        self._outgoing_lot = trio.lowlevel.ParkingLot()
        self._runs = ConflictDetector("InbandPort.run is already running")

    def _send(self) -> bool:
        if self._outgoing:
            return False
        self._outgoing = True
        self._outgoing_lot.unpark_all()
        return True

    def deliver(self) -> None:
        """Record one notification that arrived from the peer."""
        self._arrive()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued notifications until the port is closed.

        Errors from ``send`` (say ``BrokenResourceError``) propagate to the
        nursery: a doorbell that cannot ring is a broken connection.
        """
        with self._runs:
            task_status.started()
            while not self._closed:
                if not self._outgoing:
                    await self._outgoing_lot.park()
                    continue
                # Clear before sending: a notify during the send needs one more frame,
                # because the peer may already have looked at the state it announces.
                self._outgoing = False
                await self._send_fn()

    def _close_resources(self) -> None:
        super()._close_resources()
        self._outgoing_lot.unpark_all()
