"""Resource limits (the ``[limits]`` table) and the gate every connection passes.

Everything a guest can make the backend hold is bounded here or by a value
from here (issue 8, "bounded resources"): connections per guest and in total,
unauthenticated connections per source with their time and byte budget,
bytes buffered per connection and in total, fds per connection, DMA windows
and bytes per guest, and interrupt notifications per second. Exceeding a limit
gets the offender a clear error or a logged disconnect; each such event is
counted in :attr:`LimitStatistics.exceeded` under the limit's key, and the
warnings a flood of them could cause are rate-limited (XSA-157).

The transport-level limits are enforced by the transports themselves
(:class:`~shared.transport.TransportOptions`); :class:`ConnectionGate` does
the counting ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pciback._ratelog import RateLimitedLog
from shared.errors import ConfigFileError
from shared.transport import PeerIdentity

__all__ = [
    "ResourceLimits",
    "LimitStatistics",
    "ConnectionGate",
    "GateTicket",
    "LIMIT_KEYS",
    "source_of",
]

log = logging.getLogger("pcisplit.backend.limits")

_KIB, _MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class ResourceLimits:
    """The backend's resource limits; every field is a key of ``[limits]``.

    Defaults are safe for a backend serving tens of guests with small messages;
    docs/security.md lists them with what each one bounds.
    """

    #: Connections at once, all guests together (handshaking ones included).
    max_connections: int = 256
    #: Connections at once that completed the handshake as one guest.
    max_connections_per_guest: int = 8
    #: Connections at once that have not completed the handshake, per source
    #: (a TCP/TLS peer address, or a UNIX peer uid).
    max_unauthenticated_per_source: int = 64
    #: Seconds a connection may take to complete its handshake (TLS included).
    handshake_timeout: float = 10.0
    #: Largest frame accepted before the handshake (a Hello is a few hundred bytes).
    max_handshake_bytes: int = 16 * _KIB
    #: Seconds a started frame may go without a byte before the peer is dropped.
    partial_frame_timeout: float = 30.0
    #: Receive-buffer bytes one connection may hold (at least max_message_size + 4).
    max_buffered_per_connection: int = 1 * _MIB
    #: Receive-buffer bytes beyond 64 KiB per connection, all connections together.
    max_buffered_total: int = 64 * _MIB
    #: Fds one connection may hold: received and not yet taken by a request, in its
    #: transport (SCM_RIGHTS and shm announcements), and kept after the hand-over (an
    #: eventfd per interrupt vector, a memfd per shared DMA window; the dispatcher
    #: refuses a request that would keep more).
    max_fds_per_connection: int = 512
    #: DMA windows one guest may have mapped at once.
    max_dma_windows_per_guest: int = 1024
    #: Bytes of DMA windows one guest may have mapped at once.
    max_dma_bytes_per_guest: int = 1024 * _MIB
    #: Interrupt notifications per second per guest (a token bucket, XSA-332) ...
    notifications_per_second: float = 100_000.0
    #: ... and how many may come at once.
    notification_burst: int = 1024

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigFileError(f"limits.{spec.name}: expected an integer, got {value!r}")
            if spec.type == "float" and (
                not isinstance(value, int | float) or isinstance(value, bool)
            ):
                raise ConfigFileError(f"limits.{spec.name}: expected a number, got {value!r}")
            if not 0 < value < float("inf"):
                raise ConfigFileError(f"limits.{spec.name}: {value!r} must be positive")
        if self.max_connections_per_guest > self.max_connections:
            raise ConfigFileError(
                f"limits.max_connections_per_guest ({self.max_connections_per_guest}) is larger "
                f"than limits.max_connections ({self.max_connections})"
            )

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> ResourceLimits:
        """The limits named in ``table`` (a parsed ``[limits]``), defaults for the rest."""
        known = {spec.name for spec in fields(cls)}
        values = {key: table[key] for key in table if key in known}
        return cls(**values)

    def check_message_size(self, max_message_size: int) -> None:
        """One frame must fit the per-connection buffer (else no large message gets in)."""
        if self.max_buffered_per_connection < max_message_size + 4:
            raise ConfigFileError(
                f"limits.max_buffered_per_connection ({self.max_buffered_per_connection}) must "
                f"be at least limits.max_message_size + 4 ({max_message_size + 4})"
            )


#: The ``[limits]`` keys this module owns (the protocol's own two live in shared.protocol).
LIMIT_KEYS = frozenset(spec.name for spec in fields(ResourceLimits))


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
