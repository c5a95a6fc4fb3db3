"""The server's side of the handshake: who the peer says it is, and whether it may be.

A connection's first frame must be a ``Hello``. The guest it names must be
declared (``UNKNOWN_GUEST``), may use plain TCP only with
``allow_plain_tcp`` (``ACCESS_DENIED``), must be proved by the connection
(:func:`pciback.guests.identity.authorize`), must have room under the
per-guest connection limit (``BUSY``) and must speak our protocol version.
The service runs :func:`server_handshake` for every connection, inside the
handshake's time budget.
"""

from __future__ import annotations

import logging

from pciback._ratelog import RateLimitedLog
from pciback.config import BackendConfig
from pciback.guests.identity import authorize
from pciback.guests.limits import ConnectionGate, GateTicket, source_of
from pciback.guests.statistics import BackendStatistics
from shared.errors import ErrorCode
from shared.protocol import HOTPLUG_FEATURE, Connection, Hello, Role
from shared.transport import FrameTransport, get_scheme, split_address

__all__ = ["server_handshake", "handshake_refusal", "BACKEND_FEATURES"]

#: Features this backend offers in the handshake.
BACKEND_FEATURES = (
    "bus-snapshot",
    "config-access",
    "bar-access",
    "reset",
    "ping",
    "interrupts",
    "dma",
    HOTPLUG_FEATURE,
)


async def server_handshake(
    transport: FrameTransport,
    address: str,
    ticket: GateTicket,
    *,
    config: BackendConfig,
    gate: ConnectionGate,
    guest_log: RateLimitedLog,
    stats: BackendStatistics,
) -> Connection | None:
    """Run the server's side of one handshake; the open :class:`Connection`, or None.

    None when the peer left before its Hello or was refused: every refusal
    (an unknown guest, one the connection cannot prove, too many connections
    of that guest, a version mismatch) is answered with its code and a
    message that says what to do, counted in ``stats.handshakes_rejected``
    and logged, rate-limited per source through ``guest_log``.
    """
    conn = Connection(Role.SERVER, limits=config.limits, features=BACKEND_FEATURES)
    frame = await transport.receive_frame()
    hello = conn.receive(frame)
    if not isinstance(hello, Hello):
        # The table lets a Goodbye come first: the peer left before its handshake.
        guest_log.log(
            f"source {source_of(transport.peer_identity())}", "connections", logging.INFO,
            "%s: left before the handshake (%s)", transport.describe(), hello,
        )
        return None
    refusal = handshake_refusal(config, hello, transport, address)
    if refusal is None:
        crowded = gate.authenticate(ticket, hello.guest)
        if crowded is not None:
            refusal = ErrorCode.BUSY, crowded
    problem: str | None
    if refusal is None:
        problem = conn.check_version()
        code = ErrorCode.VERSION_MISMATCH
    else:
        code, problem = refusal
    if problem is not None:
        stats.handshakes_rejected += 1
        # A peer can retry a refused Hello in a loop: rate-limited per source like
        # every other line a peer can cause (the guest name it sent is only shown).
        identity = transport.peer_identity()
        guest_log.log(
            f"source {source_of(identity)}",
            "refused handshakes",
            logging.WARNING,
            "%s: handshake refused (%s) for guest %r: %s",
            identity.describe(),
            code.name,
            hello.guest,
            problem,
        )
        await transport.send_frame(conn.reject(code, problem))
        return None
    await transport.send_frame(conn.accept())
    transport.set_max_frame_size(conn.frame_size)
    await transport.start_session(is_server=True, max_frame_size=conn.frame_size)
    return conn

def handshake_refusal(
    config: BackendConfig, hello: Hello, transport: FrameTransport, address: str
) -> tuple[ErrorCode, str] | None:
    """Why ``hello`` on ``transport`` (accepted on ``address``) is refused, or None."""
    guest = config.guests.get(hello.guest)
    if guest is None:
        return ErrorCode.UNKNOWN_GUEST, (
            f"guest {hello.guest!r} is not known to this backend; known guests are declared "
            "with [[guest]] in the backend config"
        )
    scheme, _ = split_address(address)
    if not get_scheme(scheme.name).secure and not guest.allow_plain_tcp:
        return ErrorCode.ACCESS_DENIED, (
            f"guest {hello.guest!r} may not connect over {scheme.name}:// without TLS; "
            "use tls:// or set allow_plain_tcp = true for this guest in the backend config"
        )
    refusal = authorize(guest, transport.peer_identity(), scheme=scheme.name, token=hello.token)
    return None if refusal is None else (refusal.code, refusal.message)
