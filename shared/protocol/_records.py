"""What one end of a connection keeps: its state bookkeeping.

:class:`ConnectionRecords` holds the role and the state, both sides' limits,
the handshake's outcome, and the ids in flight (requests, backend calls,
hot-plug changes) with the wrapping counters that hand out fresh ones, and
answers every question about them. It changes nothing by itself: the rules
that decide what a message may do and record what it did are in ``_rules``
(:class:`~shared.protocol._rules.ConnectionRules`), and the one path that
applies them to every message sent or received is
:class:`~shared.protocol._connection.Connection`, in ``_connection``.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from shared.errors import LocalProtocolError
from shared.protocol._handshake import Handshake
from shared.protocol._messages import (
    MAX_DMA_CHUNK,
    PROTOCOL_VERSION,
    U16,
    U32,
    Goodbye,
    HandshakeRejected,
    Hello,
    Limits,
)
from shared.protocol._state import INITIAL_STATE, ConnectionState, Role

__all__ = ["ConnectionRecords", "PRE_HANDSHAKE_LIMITS", "DMA_CALL_OVERHEAD"]

#: Bytes a DmaWriteCall or DmaCallResult needs besides its ``data`` (array
#: header, tag, call id, address or code, bin header), rounded up. A chunk of
#: ``max_message_size - DMA_CALL_OVERHEAD`` bytes always fits in one frame.
DMA_CALL_OVERHEAD = 32

#: What we assume the peer accepts before its Hello/Welcome tells us: enough
#: for any handshake message, and the protocol's documented default.
PRE_HANDSHAKE_LIMITS = Limits()


def _first_free(start: int, taken: Container[int]) -> int:
    """The first u32 id from ``start`` on (wrapping) that is not in ``taken``.

    The one rule for request, call and change ids: a wrapping counter that
    skips ids still outstanding, so an id is never in use twice.
    """
    rid = start
    while rid in taken:
        rid = (rid + 1) & U32
    return rid


class ConnectionRecords:
    """The state bookkeeping of one end of a connection (the base of :class:`Connection`).

    ``role`` is :attr:`Role.CLIENT` (frontend) or :attr:`Role.SERVER`
    (backend). ``limits`` are what *this* side accepts: they are announced in
    the Hello/Welcome and enforced on every received frame. ``features`` are
    the optional features this side supports. ``guest`` is the guest name a
    client asks to act as. ``version`` is the protocol version this side
    speaks (tests use it to simulate other releases).
    """

    __slots__ = (
        "_calls",
        "_changes",
        "_handshake",
        "_limits",
        "_next_call_id",
        "_next_change_id",
        "_next_id",
        "_peer_limits",
        "_pending",
        "_role",
        "_state",
        "peer_goodbye",
    )

    def __init__(
        self,
        role: Role,
        *,
        limits: Limits,
        features: Iterable[str] = (),
        guest: str | None = None,
        version: tuple[int, int] = PROTOCOL_VERSION,
    ) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be Role.CLIENT or Role.SERVER, got {role!r}")
        if not isinstance(limits, Limits):
            raise LocalProtocolError(f"limits must be a Limits, got {type(limits).__name__}")
        offered = tuple(dict.fromkeys(features))  # de-duplicate, keep order
        if not all(isinstance(f, str) for f in offered):
            raise LocalProtocolError(f"features must be strings, got {offered!r}")
        if (
            len(version) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in version)
            or not all(0 <= v <= U16 for v in version)
        ):
            raise LocalProtocolError(f"version must be (major, minor) u16s, got {version!r}")
        self._role = role
        self._state = INITIAL_STATE[role]
        self._limits = limits
        self._peer_limits = PRE_HANDSHAKE_LIMITS
        self._handshake = Handshake(
            local_version=(version[0], version[1]), offered=offered, guest=guest
        )
        self._pending: set[int] = set()
        self._next_id = 1
        # Backend calls. SERVER: ids awaiting a result; CLIENT: ids owed a
        # result. The value is the data length an OK result must carry (the
        # read length; 0 for a write), so both sides check the same rule.
        self._calls: dict[int, int] = {}
        self._next_call_id = 1
        # Hot-plug events. SERVER: change ids awaiting an acknowledgement;
        # CLIENT: change ids it owes an acknowledgement.
        self._changes: set[int] = set()
        self._next_change_id = 1
        #: The Goodbye the peer sent, if it closed the connection.
        self.peer_goodbye: Goodbye | None = None

    # ------------------------------------------------------------------ introspection

    @property
    def role(self) -> Role:
        """CLIENT (frontend) or SERVER (backend)."""
        return self._role

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._state

    @property
    def limits(self) -> Limits:
        """What this side accepts (announced in its Hello/Welcome)."""
        return self._limits

    @property
    def peer_limits(self) -> Limits:
        """What the peer accepts; :data:`PRE_HANDSHAKE_LIMITS` until it told us."""
        return self._peer_limits

    @property
    def guest(self) -> str | None:
        """The guest this connection acts for: requested (client) / claimed (server)."""
        return self._handshake.guest

    @property
    def peer_hello(self) -> Hello | None:
        """SERVER: the Hello the frontend sent (None on a CLIENT)."""
        return self._handshake.hello if self._role is Role.SERVER else None

    @property
    def rejection(self) -> HandshakeRejected | None:
        """CLIENT: the rejection the backend sent, if it refused the handshake."""
        return self._handshake.rejection

    @property
    def local_version(self) -> tuple[int, int]:
        """The protocol version this side speaks."""
        return self._handshake.local_version

    @property
    def version(self) -> tuple[int, int] | None:
        """The negotiated version once OPEN, else None."""
        return self._handshake.version

    @property
    def features(self) -> tuple[str, ...]:
        """The negotiated features (both sides support them); empty before OPEN."""
        return self._handshake.features

    @property
    def outstanding(self) -> frozenset[int]:
        """Request ids awaiting a reply: sent by us (CLIENT) or received by us (SERVER)."""
        return frozenset(self._pending)

    @property
    def requests_in_flight(self) -> int:
        """How many requests await a reply (``len(outstanding)``)."""
        return len(self._pending)

    def next_request_id(self) -> int:
        """A fresh request id: a wrapping u32 counter that skips ids still outstanding."""
        rid = _first_free(self._next_id, self._pending)
        self._next_id = (rid + 1) & U32
        return rid

    @property
    def outstanding_calls(self) -> frozenset[int]:
        """SERVER: call ids of DmaReadCall/DmaWriteCall sent and not yet answered.

        Always empty on a CLIENT (see :attr:`owed_calls`).
        """
        return frozenset(self._calls) if self._role is Role.SERVER else frozenset()

    @property
    def owed_calls(self) -> frozenset[int]:
        """CLIENT: call ids received in DmaReadCall/DmaWriteCall and not yet answered.

        Always empty on a SERVER (see :attr:`outstanding_calls`).
        """
        return frozenset(self._calls) if self._role is Role.CLIENT else frozenset()

    @property
    def frame_size(self) -> int:
        """The largest frame either side sends on this connection, once the limits are known.

        The smaller of both ``max_message_size``: each side sends at most what
        the other accepts, and a transport that sizes one buffer for both
        directions (the ``shm:`` ring) must agree with its peer on one number.
        Both the frontend and the backend size their transport with it.
        """
        return min(self._limits.max_message_size, self._peer_limits.max_message_size)

    @property
    def max_dma_chunk(self) -> int:
        """The largest ``data``/``length`` one DMA call may carry on this connection.

        :data:`MAX_DMA_CHUNK`, lowered so that a DmaWriteCall fits the peer's
        ``max_message_size`` and a DmaCallResult fits ours (before the
        handshake the peer's limits are the defaults). A backend splits
        message-based DMA into chunks of at most this many bytes.
        """
        return min(MAX_DMA_CHUNK, self.frame_size - DMA_CALL_OVERHEAD)

    def next_call_id(self) -> int:
        """SERVER: a fresh call id: a wrapping u32 counter that skips outstanding ids."""
        if self._role is not Role.SERVER:
            raise LocalProtocolError(
                "only the backend (SERVER) makes calls; a frontend answers them with "
                "DmaCallResult using the call id it received"
            )
        cid = _first_free(self._next_call_id, self._calls)
        self._next_call_id = (cid + 1) & U32
        return cid

    @property
    def outstanding_changes(self) -> frozenset[int]:
        """SERVER: change ids of hot-plug events sent and not yet acknowledged.

        Always empty on a CLIENT (see :attr:`owed_changes`).
        """
        return frozenset(self._changes) if self._role is Role.SERVER else frozenset()

    @property
    def owed_changes(self) -> frozenset[int]:
        """CLIENT: change ids of hot-plug events received and not yet acknowledged.

        Always empty on a SERVER (see :attr:`outstanding_changes`).
        """
        return frozenset(self._changes) if self._role is Role.CLIENT else frozenset()

    def next_change_id(self) -> int:
        """SERVER: a fresh change id: a wrapping u32 counter that skips outstanding ids."""
        if self._role is not Role.SERVER:
            raise LocalProtocolError(
                "only the backend (SERVER) announces hot-plug changes; a frontend "
                "acknowledges them with DeviceChangeAck using the change id it received"
            )
        cid = _first_free(self._next_change_id, self._changes)
        self._next_change_id = (cid + 1) & U32
        return cid

