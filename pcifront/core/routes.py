"""The small interface a bus offers the parts that hang off it.

:class:`~pcifront.Interrupts` blocks and :class:`~pcifront.DmaBuffer`\\ s need
four things of their bus: make a request, know the negotiated features and
whether fds can travel, and register with the receive side (interrupt sinks
by device; the DMA space). They get exactly that, as a :class:`BusLink`,
instead of reaching into the bus's private methods. So ``_interrupts`` and
``_dma`` import this module and nothing of ``_client``: there is no import
cycle, and the blocking client (:mod:`pcifront.blocking`) reuses the same
receive-side routing (:class:`InterruptRoutes`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from shared.pci import PciAddress
from shared.protocol import Reply, Request

__all__ = ["BusLink", "BusStatistics", "InterruptRoutes", "InterruptSink", "CallFunction"]

log = logging.getLogger("pcisplit.frontend")


@dataclass
class BusStatistics:
    """Counters of one connection. ``stray_interrupts``: fired while no block was active."""

    requests_sent: int = 0
    replies_received: int = 0
    errors_received: int = 0
    events_received: int = 0
    max_in_flight_seen: int = 0
    interrupt_events: int = 0
    stray_interrupts: int = 0
    dma_calls_answered: int = 0
    dma_calls_faulted: int = 0
    dma_faults: int = 0
    dma_faults_unread: int = 0
    #: Hot-plug events received (each acknowledged), and successful reconnects.
    hotplug_events: int = 0
    reconnects: int = 0
    #: Replies that came after their request timed out or was cancelled.
    late_replies: int = 0


class InterruptSink(Protocol):
    """Where the receive side posts a device's interrupts (an active interrupts() block)."""

    def _post(self, vector: int, count: int) -> None: ...

    def _close(self) -> None: ...

    def _lose(self, reason: str) -> None: ...


class CallFunction(Protocol):
    """``await call(make, fds=...)``: send ``make(request_id)`` and return its reply."""

    def __call__(
        self, make: Callable[[int], Request], *, fds: list[int] | None = None
    ) -> Awaitable[Reply]: ...


class InterruptRoutes:
    """Active interrupt blocks by packed device address, and stray counting."""

    __slots__ = ("_active", "_stray_logged", "stats")

    def __init__(self, stats: BusStatistics) -> None:
        self._active: dict[int, InterruptSink] = {}
        self._stray_logged: set[int] = set()
        self.stats = stats

    def has_interrupts(self, packed: int) -> bool:
        return packed in self._active

    @property
    def active(self) -> dict[int, InterruptSink]:
        """The active interrupts blocks by packed device address (do not modify)."""
        return self._active

    def close_all_interrupts(self, reason: str) -> int:
        """The connection is gone: every interrupts block ends (its device's session did).

        Each block's waiters and later calls get :class:`~pcifront.ResourceLostError`
        naming ``reason``. Returns how many blocks ended.
        """
        sinks = list(self._active.values())
        for sink in sinks:
            sink._lose(reason)
        self._active.clear()
        self._stray_logged.clear()
        return len(sinks)

    def attach_interrupts(self, packed: int, sink: InterruptSink) -> None:
        self._active[packed] = sink

    def detach_interrupts(self, packed: int, sink: InterruptSink) -> None:
        if self._active.get(packed) is sink:
            del self._active[packed]

    def route_interrupt(self, packed: int, vector: int, count: int) -> None:
        """An interrupt arrived for ``packed``: post it, or count it as stray."""
        self.stats.interrupt_events += 1
        sink = self._active.get(packed)
        if sink is None:
            self.count_stray(packed, count)
        else:
            sink._post(vector, count)

    def count_stray(self, packed: int, count: int) -> None:
        self.stats.stray_interrupts += count
        if packed not in self._stray_logged:
            # Logged once per device: a storm must not become a log storm.
            self._stray_logged.add(packed)
            log.warning(
                "interrupt for device %s while no interrupts() block is active; counted in "
                "statistics().stray_interrupts, not queued",
                PciAddress.unpack(packed) if packed <= 0xFFFFFFFF else packed,
            )


class BusLink(InterruptRoutes):
    """What an async interrupts block or DMA buffer may use of its (trio) bus."""

    __slots__ = ("call", "can_pass_fds", "disable_timeout", "features")

    def __init__(
        self,
        call: CallFunction,
        *,
        features: tuple[str, ...],
        can_pass_fds: bool,
        disable_timeout: float,
        stats: BusStatistics,
    ) -> None:
        super().__init__(stats)
        #: Send a request and wait for its reply (raises the typed error of an ErrorReply).
        self.call = call
        self.features = features
        self.can_pass_fds = can_pass_fds
        #: Bound on the shielded disable request when an interrupts() block ends.
        self.disable_timeout = disable_timeout

    def rebind(self, *, features: tuple[str, ...], can_pass_fds: bool) -> None:
        """A new connection replaced the old one (``connect(reconnect=True)``)."""
        self.features = features
        self.can_pass_fds = can_pass_fds
