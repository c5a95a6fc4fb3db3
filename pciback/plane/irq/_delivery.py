"""Interrupt delivery: per-session outboxes, coalescing, and per-guest token buckets.

An :class:`InterruptOutbox` belongs to one guest session. It coalesces per
``(device, vector)`` while an interrupt is not yet delivered and spends one
token of the guest's :class:`TokenBucket` per delivery, so a device storm
becomes a bounded event rate with growing counts instead of a flood
(XSA-332). Vectors bound to eventfds are signalled by writing the eventfd
(the kernel counter coalesces); the rest go out as in-band
:class:`~shared.protocol.InterruptEvent` messages through the session's one
send path.

The eventfds are the guest's: it shares their open file description and can
clear ``O_NONBLOCK`` on them. Their writes go through the guarded C path of
:class:`~shared.evtchn.EventfdPort`, so a full counter is a delivery that
coalesced (counted in ``counter_full``) and a write the guest made block is cut
short after :data:`~shared.evtchn.GUARD_SECONDS` and raises
:class:`~shared.evtchn.EventfdStalledError`. The outbox then closes that port,
counts it (``stalled``) and makes :meth:`InterruptOutbox.run` raise the error,
so the session disconnects the guest: an honest guest never does this.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from pciback._ratelog import GUEST_LOG_BURST, GUEST_LOG_RATE, TokenBucket
from shared.evtchn import EventfdStalledError, Port
from shared.protocol import InterruptEvent

__all__ = ["InterruptLimits", "TokenBucket", "InterruptOutbox", "OutboxStatistics"]

_U32 = 0xFFFF_FFFF


@dataclass(frozen=True)
class InterruptLimits:
    """Per-guest delivery limits (``[interrupts]`` in the backend config).

    ``max_events_per_second`` and ``burst`` form the token bucket that every
    delivery (one eventfd write or one InterruptEvent) spends from.
    ``warnings_per_second``/``warning_burst`` limit the log lines a guest can
    cause (XSA-157: repeated enable_msi flooded Xen's logs).
    """

    max_events_per_second: float = 100_000.0
    burst: int = 1024
    warnings_per_second: float = GUEST_LOG_RATE
    warning_burst: int = GUEST_LOG_BURST


# --------------------------------------------------------------------------- delivery


@dataclass
class OutboxStatistics:
    posted: int = 0
    coalesced: int = 0
    events_sent: int = 0
    eventfd_signals: int = 0
    throttled: int = 0  # times the drain waited for a token
    dropped: int = 0  # pending deliveries dropped because the binding went away
    counter_full: int = 0  # eventfd writes skipped: the guest's counter was full (coalesced)
    stalled: int = 0  # eventfd writes the guest made block (cut short; the port is closed)


class InterruptOutbox:
    """One session's interrupt deliveries: coalesced per (device, vector), rate-limited.

    ``bucket`` is the guest's delivery budget (shared by the guest's sessions).
    :meth:`run` is the drain task; it calls ``send_event`` for in-band events.
    """

    def __init__(self, guest: str, bucket: TokenBucket) -> None:
        self.guest = guest
        self._bucket = bucket
        self._pending: dict[tuple[int, int], int] = {}
        self._ports: dict[tuple[int, int], Port] = {}
        self._wakeup = trio.Event()
        self._stalled: EventfdStalledError | None = None
        self.stats = OutboxStatistics()

    def statistics(self) -> OutboxStatistics:
        return self.stats

    @property
    def held_fds(self) -> int:
        """Guest eventfds this outbox owns (one per vector bound to an eventfd)."""
        return len(self._ports)

    def bind_ports(self, device: int, ports: Sequence[Port]) -> None:
        """Deliver ``device``'s vectors 0..n-1 through ``ports`` (the outbox now owns them)."""
        for vector, port in enumerate(ports):
            old = self._ports.pop((device, vector), None)
            if old is not None:
                old.close()
            self._ports[(device, vector)] = port

    def unbind(self, device: int) -> None:
        """Forget ``device``: close its ports and drop its undelivered interrupts."""
        for key in [k for k in self._ports if k[0] == device]:
            self._ports.pop(key).close()
        for key in [k for k in self._pending if k[0] == device]:
            del self._pending[key]
            self.stats.dropped += 1

    def post(self, device: int, vector: int) -> None:
        """Queue one interrupt; never blocks, never sends on the caller's stack (but eventfds)."""
        stats = self.stats
        stats.posted += 1
        key = (device, vector)
        pending = self._pending
        if key in pending:
            pending[key] += 1
            stats.coalesced += 1
            return
        port = self._ports.get(key)
        if port is not None and not pending and self._bucket.take():
            # Fast path: an eventfd write is one guarded syscall, so deliver it
            # at once rather than paying a task switch (the interrupt round-trip budget).
            self._signal(key, port)
            return
        pending[key] = 1
        self._wakeup.set()

    def _signal(self, key: tuple[int, int], port: Port) -> None:
        """Write the guest's eventfd; never raises (a stall is recorded for :meth:`run`)."""
        try:
            sent = port.notify()
        except EventfdStalledError as exc:
            self.stats.stalled += 1
            self._ports.pop(key, None)
            port.close()
            if self._stalled is None:
                self._stalled = exc
            self._wakeup.set()
            return
        if sent:
            self.stats.eventfd_signals += 1
        else:
            self.stats.counter_full += 1

    @property
    def backlog(self) -> int:
        """(device, vector) pairs waiting for delivery."""
        return len(self._pending)

    async def run(self, send_event: Callable[[InterruptEvent], Awaitable[None]]) -> None:
        """Drain the queue forever, one token per delivery, oldest first.

        Raises :class:`~shared.evtchn.EventfdStalledError` once a guest eventfd
        stalled a write (see the module docstring); the caller drops the guest.
        """
        pending = self._pending
        while True:
            while not pending:
                if self._stalled is not None:
                    raise self._stalled
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            if not self._bucket.take():
                self.stats.throttled += 1
                await trio.sleep(self._bucket.wait_time())
                continue
            key = next(iter(pending))
            count = pending.pop(key)
            port = self._ports.get(key)
            if port is not None:
                self._signal(key, port)
            else:
                self.stats.events_sent += 1
                await send_event(InterruptEvent(key[0], key[1], min(count, _U32)))

    def close(self) -> None:
        """Close every port (the eventfds the guest sent) and drop what is queued."""
        for port in self._ports.values():
            port.close()
        self._ports.clear()
        self.stats.dropped += len(self._pending)
        self._pending.clear()
