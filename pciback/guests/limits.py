"""The gate every connection passes, under the resource limits (``[limits]``).

Everything a guest can make the backend hold is bounded here or by a value
from here (issue 8, "bounded resources"): connections per guest and in total,
unauthenticated connections per source with their time and byte budget,
bytes buffered per connection and in total, fds per connection, DMA windows
and bytes per guest, and interrupt notifications per second. Exceeding a limit
gets the offender a clear error or a logged disconnect; each such event is
counted in :attr:`LimitStatistics.exceeded` under the limit's key, and the
warnings a flood of them could cause are rate-limited (XSA-157).

The limits themselves are parsed with the rest of the config
(:class:`pciback.config.ResourceLimits`). The transport-level limits are
enforced by the transports themselves (:class:`~shared.transport.TransportOptions`);
:class:`ConnectionGate` does the counting ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pciback._ratelog import RateLimitedLog
from pciback.config import ResourceLimits
from shared.transport import PeerIdentity

__all__ = [
    "LimitStatistics",
    "ConnectionGate",
    "GateTicket",
    "source_of",
]

log = logging.getLogger("pcisplit.backend.limits")


@dataclass
class LimitStatistics:
    """``exceeded``: limit key -> times someone went over it. ``warnings_suppressed``:
    log lines not written because of the rate limit."""

    exceeded: Counter[str] = field(default_factory=Counter)
    warnings_suppressed: int = 0
    unauthenticated: int = 0
    connections: int = 0


def source_of(identity: PeerIdentity) -> str:
    """Who a not-yet-authenticated connection comes from, for the per-source limit.

    UNIX and shm peers by uid (the kernel vouches for it), TCP and TLS peers by
    address without the port; anything else counts as one unknown source.
    """
    if identity.uid is not None:
        return f"uid:{identity.uid}"
    if identity.address:
        host, _, port = identity.address.rpartition(":")
        return f"ip:{host}" if host and port.isdigit() else f"ip:{identity.address}"
    return "unknown"


class GateTicket:
    """One admitted connection's place in the counts (see :class:`ConnectionGate`)."""

    __slots__ = ("guest", "released", "source")

    def __init__(self, source: str) -> None:
        self.source: str | None = source
        self.guest: str | None = None
        self.released = False


class ConnectionGate:
    """Counts connections (total, unauthenticated per source, per guest) and refuses extras.

    ``admit`` when a connection is accepted, ``authenticate`` when its Hello
    named a guest, ``release`` when it ends, whatever happened in between.
    """

    def __init__(self, limits: ResourceLimits, *, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.stats = LimitStatistics()
        self._clock = clock
        self._total = 0
        self._unauthenticated: Counter[str] = Counter()
        self._guests: Counter[str] = Counter()
        #: Warnings over a limit: at most one a second per limit, the rest counted and
        #: summarised (the backend's one rule for guest-triggered lines).
        self.log = RateLimitedLog(log, rate=1.0, burst=1, clock=clock)

    def statistics(self) -> LimitStatistics:
        self.stats.connections = self._total
        self.stats.unauthenticated = sum(self._unauthenticated.values())
        return self.stats

    def exceeded(self, limit: str, message: str, *args: object) -> None:
        """Count one event over ``limit`` and log it, at most once a second per limit."""
        self.stats.exceeded[limit] += 1
        kind = f"{limit} events"
        if not self.log.log("limits", kind, logging.WARNING, "limit %s: " + message, limit, *args):
            self.stats.warnings_suppressed += 1

    def admit(self, source: str) -> GateTicket | None:
        """A new connection from ``source``; None (counted and logged) when over a limit."""
        limits = self.limits
        if self._total >= limits.max_connections:
            self.exceeded(
                "max_connections", "%d connections already; refused one from %s",
                self._total, source,
            )
            return None
        if self._unauthenticated[source] >= limits.max_unauthenticated_per_source:
            self.exceeded(
                "max_unauthenticated_per_source",
                "%s already has %d connections without a completed handshake; refused another",
                source, self._unauthenticated[source],
            )
            return None
        self._total += 1
        self._unauthenticated[source] += 1
        return GateTicket(source)

    def authenticate(self, ticket: GateTicket, guest: str) -> str | None:
        """The connection's Hello named ``guest``: None if admitted, else why not."""
        self._leave_unauthenticated(ticket)
        if self._guests[guest] >= self.limits.max_connections_per_guest:
            self.exceeded(
                "max_connections_per_guest", "guest %s already has %d connections; refused one",
                guest, self._guests[guest],
            )
            return (
                f"guest {guest!r} already has {self._guests[guest]} connections, the most "
                "allowed (limits.max_connections_per_guest); close one and retry"
            )
        ticket.guest = guest
        self._guests[guest] += 1
        return None

    def _leave_unauthenticated(self, ticket: GateTicket) -> None:
        source = ticket.source
        if source is not None:
            ticket.source = None
            self._unauthenticated[source] -= 1
            if not self._unauthenticated[source]:
                del self._unauthenticated[source]

    def release(self, ticket: GateTicket) -> None:
        """The connection ended. Idempotent per ticket."""
        if ticket.released:
            return
        ticket.released = True
        self._leave_unauthenticated(ticket)
        guest = ticket.guest
        if guest is not None:
            ticket.guest = None
            self._guests[guest] -= 1
            if not self._guests[guest]:
                del self._guests[guest]
        self._total -= 1
