"""The ``[limits]`` table: every resource limit of the backend, validated.

Each limit is enforced where its resource is held (the connection gate in
:mod:`pciback.guests.limits`, the transports, the dispatcher, the DMA hub,
the interrupt router); this module only says what the limits are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from shared.errors import ConfigFileError

__all__ = ["ResourceLimits", "LIMIT_KEYS"]

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
