"""The sans-I/O connection: bytes in, messages out; messages in, bytes out.

A :class:`Connection` never touches a socket or a clock. The caller moves the
bytes :meth:`Connection.send` returns to its transport, and hands every frame
it receives to :meth:`Connection.receive`. The connection enforces both sides'
limits and keeps the exactly-one-reply-per-request bookkeeping; the handshake
(versions, features, guest) lives apart in ``_handshake``.

The rules in one place
----------------------
Sending and receiving go through the same two steps, :meth:`Connection._check`
then :meth:`Connection._commit`. ``_check`` looks the message up in the state
table (``_state.TRANSITIONS``) and applies the rule for its kind (one table,
:data:`_CHECKS`); each rule is written once and holds in both directions.
Who broke a rule decides the error: when *we* were about to send it, it is a
:class:`LocalProtocolError` and nothing changes; when the *peer* sent it, it
is a :class:`RemoteProtocolError` and the connection moves to ``ERROR``.
``_commit`` then records what the message did (one table, :data:`_COMMITS`).

Which errors end a connection
-----------------------------
*Fatal* (the state becomes ``ERROR``; send at most a courtesy Goodbye, then
close the transport): an undecodable or oversized frame with no readable
request id, anything illegal during the handshake, a message the table does
not allow, a reply to an id that is not outstanding, a duplicate request id,
and on the backend call path (below) a result for a call id that is not
outstanding or a result whose data does not fit its call; on the frontend a
call reusing an owed call id, or more calls than its ``max_in_flight``.

Backend calls
-------------
The backend may *call* the frontend (message-based DMA): it sends a
:class:`DmaReadCall` or :class:`DmaWriteCall` (events) with a ``call_id``
from :meth:`Connection.next_call_id`, and the frontend answers each with
exactly one :class:`DmaCallResult`. The SERVER tracks the ids it awaits
(:attr:`Connection.outstanding_calls`, at most the frontend's
``max_in_flight``); the CLIENT tracks the ids it owes
(:attr:`Connection.owed_calls`).

Hot-plug
--------
With the ``hotplug`` feature negotiated, the backend announces each device
that joins or leaves the guest's bus with a :class:`DeviceAddedEvent` or
:class:`DeviceRemovedEvent` carrying a ``change_id`` from
:meth:`Connection.next_change_id`; the frontend acknowledges each with
exactly one :class:`DeviceChangeAck`. The SERVER tracks the ids awaiting an
acknowledgement (:attr:`Connection.outstanding_changes`, at most the
frontend's ``max_in_flight``), the CLIENT the ids it owes
(:attr:`Connection.owed_changes`). An acknowledgement of an id that is not
outstanding, a reused id, or a hot-plug event without the feature is fatal.

*Answerable* (the state stays ``OPEN``; a backend answers and carries on):
a malformed request whose request id could be read (``PROTOCOL_ERROR``, or a
precise code such as ``INVALID_SIZE``), an unknown operation
(``NOT_IMPLEMENTED``), and a request over our in-flight limit (``BUSY``,
:class:`PeerOverLimitError`). For those, :meth:`Connection.error_reply_for`
returns the :class:`ErrorReply` to send.

After the end
-------------
Once the connection is ``CLOSED`` or ``ERROR`` the table allows nothing but a
courtesy Goodbye. A backend that still holds replies (computed before the
guest's Goodbye or fatal frame arrived) or events asks :meth:`Connection.can_send`
and drops them, counting them, rather than calling :meth:`Connection.send`,
which would rightly raise.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from typing import NoReturn

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol._codec import MalformedMessageError, decode, encode
from shared.protocol._handshake import Handshake, clip_text, version_mismatch_message
from shared.protocol._messages import (
    HOTPLUG_FEATURE,
    MAX_DMA_CHUNK,
    PROTOCOL_VERSION,
    U16,
    U32,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceRemovedEvent,
    DmaCallResult,
    DmaReadCall,
    DmaWriteCall,
    ErrorReply,
    Goodbye,
    HandshakeRejected,
    Hello,
    Limits,
    Message,
    Reply,
    Request,
    Welcome,
)
from shared.protocol._state import (
    INITIAL_STATE,
    TERMINAL_STATES,
    TRANSITIONS,
    ConnectionState,
    Direction,
    MessageKind,
    Role,
    message_kind,
)

__all__ = [
    "Connection",
    "PRE_HANDSHAKE_LIMITS",
    "PeerOverLimitError",
    "TooManyInFlightError",
    "MessageTooLargeError",
    "version_mismatch_message",
    "DMA_CALL_OVERHEAD",
]

#: Bytes a DmaWriteCall or DmaCallResult needs besides its ``data`` (array
#: header, tag, call id, address or code, bin header), rounded up. A chunk of
#: ``max_message_size - DMA_CALL_OVERHEAD`` bytes always fits in one frame.
DMA_CALL_OVERHEAD = 32

#: What we assume the peer accepts before its Hello/Welcome tells us: enough
#: for any handshake message, and the protocol's documented default.
PRE_HANDSHAKE_LIMITS = Limits()

_OPEN = ConnectionState.OPEN
_ERROR = ConnectionState.ERROR
_SEND = Direction.SEND
_RECV = Direction.RECEIVE
_K = MessageKind


class PeerOverLimitError(RemoteProtocolError):
    """The peer sent more requests in flight than our ``max_in_flight``.

    Answerable: the connection stays OPEN and ``request_id`` is outstanding,
    so the backend answers it with ``BUSY`` (see
    :meth:`Connection.error_reply_for`).
    """

    code = ErrorCode.BUSY

    def __init__(self, message: str, *, request_id: int) -> None:
        super().__init__(message)
        self.request_id = request_id


class TooManyInFlightError(LocalProtocolError):
    """Sending this request would exceed the peer's ``max_in_flight``.

    Nothing was sent and the connection is unchanged: wait for a reply, then
    send again.
    """

    code = ErrorCode.BUSY


class MessageTooLargeError(LocalProtocolError):
    """The encoded message is larger than the peer's ``max_message_size``.

    Nothing was sent and the connection is unchanged; for a reply, answer the
    request with an :class:`ErrorReply` instead (the id is still outstanding;
    :meth:`Connection.send_reply` does that for you).
    """


def _first_free(start: int, taken: Container[int]) -> int:
    """The first u32 id from ``start`` on (wrapping) that is not in ``taken``.

    The one rule for request, call and change ids: a wrapping counter that
    skips ids still outstanding, so an id is never in use twice.
    """
    rid = start
    while rid in taken:
        rid = (rid + 1) & U32
    return rid


class Connection:
    """One end of a pcisplit connection, with no I/O.

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

    def can_send(self, msg: Message | type[Message]) -> bool:
        """Whether the state table lets this side send ``msg`` (a message or its class) now.

        Only the state is consulted: :meth:`send` may still refuse a message
        for what it says (an id that is not outstanding, a size over the
        peer's limit). A backend asks this before sending a reply or event it
        prepared earlier, because the guest may have said Goodbye, or broken
        the protocol, in the meantime.
        """
        return (self._role, self._state, _SEND, message_kind(msg)) in TRANSITIONS

    def __repr__(self) -> str:
        return (
            f"<Connection {self._role.name} {self._state.name} guest={self.guest!r} "
            f"in_flight={len(self._pending)} calls={len(self._calls)}>"
        )

    # ------------------------------------------------------------------ the one path

    def send(self, msg: Message) -> bytes:
        """Check that ``msg`` may be sent now, and return its encoded payload.

        The payload is *not* length-prefixed; stream transports frame it with
        ``encode_frame``. Raises :class:`LocalProtocolError` (the connection
        unchanged) if the state forbids ``msg``, if it is a reply to a request
        that is not outstanding, a request whose id is already outstanding,
        :class:`TooManyInFlightError` over the peer's ``max_in_flight``, or
        :class:`MessageTooLargeError` over the peer's ``max_message_size``.

        Backend calls: a SERVER sending DmaReadCall/DmaWriteCall registers its
        ``call_id`` as outstanding (a duplicate outstanding id is refused;
        more calls than the frontend's ``max_in_flight`` is
        :class:`TooManyInFlightError`; a read whose result would not fit the
        backend's frames is refused). A CLIENT may send a DmaCallResult only
        for an owed call id, once, with exactly the read length of data on
        success (none for a write) and no data on failure.
        """
        plan = self._check(_SEND, msg)
        data = encode(msg)
        limit = self._peer_limits.max_message_size
        if len(data) > limit:
            raise MessageTooLargeError(
                f"{type(msg).__name__} encodes to {len(data)} bytes; the "
                f"{self._role.peer_side} accepts at most {limit}"
            )
        self._commit(_SEND, plan, msg)
        return data

    def receive(self, frame: bytes) -> Message:
        """Decode one received frame (payload, no length prefix) and apply it.

        Returns the message. Raises :class:`RemoteProtocolError` (see the
        module docstring for which are fatal and which answerable), and
        :class:`LocalProtocolError` if called after the connection ended.
        """
        if self._state in TERMINAL_STATES:
            raise LocalProtocolError(
                f"the connection is {self._state.name}; stop feeding it frames and close "
                "the transport"
            )
        try:
            msg = decode(frame, max_size=self._limits.max_message_size)
        except MalformedMessageError as err:
            rid = err.request_id
            if (
                self._role is Role.SERVER
                and self._state is _OPEN
                and rid is not None
                and rid not in self._pending
            ):
                # Answerable: keep the id outstanding so exactly one ErrorReply can go back.
                self._pending.add(rid)
            else:
                self._state = _ERROR
            raise
        self._commit(_RECV, self._check(_RECV, msg), msg)
        return msg

    def _check(self, direction: Direction, msg: Message) -> _Plan:
        """The state table, then the rule for ``msg``'s kind. Changes nothing unless broken."""
        key = (self._role, self._state, direction, type(msg))
        plan = _PLANS.get(key)
        if plan is None:
            plan = _make_plan(key)
        if plan[1] is None:
            if direction is _SEND:
                text = (
                    f"a {self._role.side} cannot send {type(msg).__name__} while the "
                    f"connection is {self._state.name}"
                )
            else:
                text = (
                    f"the {self._role.peer_side} sent {type(msg).__name__}, which is not "
                    f"allowed while this {self._role.side} connection is {self._state.name}"
                )
            self._broken(direction, text)
        check = plan[2]
        if check is not None:
            check(self, direction, msg)
        return plan

    def _commit(self, direction: Direction, plan: _Plan, msg: Message) -> None:
        """Record what a message that passed :meth:`_check` did, and move to its target state."""
        self._state = plan[1]  # type: ignore[assignment]  # _check refused None
        commit = plan[3]
        if commit is not None:
            commit(self, direction, msg)

    def _broken(
        self,
        direction: Direction,
        text: str,
        local_error: type[LocalProtocolError] = LocalProtocolError,
    ) -> NoReturn:
        """A rule is broken: ours to fix when sending, the peer's (fatal) when receiving."""
        if direction is _SEND:
            raise local_error(text)
        self._state = _ERROR
        raise RemoteProtocolError(text)

    def _side_limits(self) -> tuple[Limits, Limits]:
        """(frontend's limits, backend's limits), whichever end we are."""
        if self._role is Role.CLIENT:
            return self._limits, self._peer_limits
        return self._peer_limits, self._limits

    # ------------------------------------------------------------------ the rules, by kind

    def _check_request(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Request)
        rid = msg.request_id
        if rid in self._pending:
            if direction is _SEND:
                self._broken(
                    direction, f"request id {rid} is still outstanding; use next_request_id()"
                )
            self._broken(
                direction,
                f"the frontend reused request id {rid} while it is still outstanding; "
                "a reply could not say which request it answers",
            )
        cap = self._side_limits()[1].max_in_flight
        if direction is _SEND and len(self._pending) >= cap:
            # Received over the limit is answerable (BUSY): see _commit_request.
            raise TooManyInFlightError(
                f"{len(self._pending)} requests are in flight and the backend accepts at most "
                f"{cap}; wait for a reply before sending more"
            )

    def _commit_request(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Request)
        self._pending.add(msg.request_id)
        cap = self._limits.max_in_flight
        if direction is _RECV and len(self._pending) > cap:
            raise PeerOverLimitError(
                f"too many requests in flight: the backend accepts {cap} at once; wait for "
                "replies before sending more",
                request_id=msg.request_id,
            )

    def _check_reply(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Reply)
        rid = msg.request_id
        if rid not in self._pending:
            if direction is _SEND:
                self._broken(
                    direction,
                    f"no request {rid} is outstanding: every request gets exactly one reply, "
                    "and only requests the frontend sent can be answered",
                )
            self._broken(
                direction,
                f"the backend replied to request {rid}, which is not outstanding (never sent, "
                "or already answered)",
            )

    def _commit_reply(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Reply)
        self._pending.discard(msg.request_id)

    def _check_hello(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Hello)
        problem = self._handshake.hello_problem(msg)
        if problem is not None:
            self._broken(direction, problem)

    def _commit_hello(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Hello)
        self._handshake.on_hello(msg, sent=direction is _SEND)
        self._record_limits(direction, msg.limits)

    def _check_welcome(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Welcome)
        problem = self._handshake.welcome_problem(self._role, msg)
        if problem is not None:
            self._broken(direction, problem)

    def _commit_welcome(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Welcome)
        self._handshake.on_welcome(msg)
        self._record_limits(direction, msg.limits)

    def _record_limits(self, direction: Direction, limits: Limits) -> None:
        # What we announce is what we enforce; what the peer announces, we respect.
        if direction is _SEND:
            self._limits = limits
        else:
            self._peer_limits = limits

    def _commit_rejection(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, HandshakeRejected)
        self._handshake.on_rejection(msg)

    def _commit_goodbye(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, Goodbye)
        if direction is _RECV:
            self.peer_goodbye = msg

    def _check_event(self, direction: Direction, msg: Message) -> None:
        if isinstance(msg, DeviceAddedEvent | DeviceRemovedEvent):
            self._check_change(direction, msg)
            return
        if not isinstance(msg, DmaReadCall | DmaWriteCall):
            return
        cid = msg.call_id
        if cid in self._calls:
            if direction is _SEND:
                self._broken(direction, f"call id {cid} is still outstanding; use next_call_id()")
            self._broken(
                direction,
                f"the backend reused DMA call id {cid} while it is still owed a result; a "
                "result could not say which call it answers",
            )
        frontend, backend = self._side_limits()
        cap = frontend.max_in_flight
        if len(self._calls) >= cap:
            self._broken(
                direction,
                f"{len(self._calls)} DMA calls await results and the frontend accepts at most "
                f"{cap} (its max_in_flight); wait for a DmaCallResult before calling again",
                TooManyInFlightError,
            )
        if isinstance(msg, DmaReadCall):
            room = min(MAX_DMA_CHUNK, backend.max_message_size - DMA_CALL_OVERHEAD)
            if msg.length > room:
                self._broken(
                    direction,
                    f"DmaReadCall of {msg.length} bytes: its result would not fit in one frame "
                    f"the backend accepts, which holds at most {room} bytes of data; split the "
                    "read into chunks of at most max_dma_chunk bytes",
                )

    def _commit_event(self, direction: Direction, msg: Message) -> None:
        if isinstance(msg, DeviceAddedEvent | DeviceRemovedEvent):
            self._changes.add(msg.change_id)
        elif isinstance(msg, DmaReadCall):
            self._calls[msg.call_id] = msg.length
        elif isinstance(msg, DmaWriteCall):
            self._calls[msg.call_id] = 0

    def _check_call_result(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, DmaCallResult)
        cid = msg.call_id
        expected = self._calls.get(cid)
        if expected is None:
            if direction is _SEND:
                self._broken(
                    direction,
                    f"no DMA call {cid} is owed: a DmaCallResult answers a DmaReadCall/"
                    "DmaWriteCall received from the backend, exactly once",
                )
            # The frontend lied about a call: the backend cannot trust anything it
            # says about guest memory any more (fatal).
            self._broken(
                direction,
                f"the frontend answered DMA call {cid}, which is not outstanding (never made, "
                "or already answered)",
            )
        if msg.code is ErrorCode.OK:
            if len(msg.data) != expected:
                self._broken(
                    direction,
                    f"DmaCallResult for call {cid} carries {len(msg.data)} bytes, but a "
                    f"successful result must carry exactly {expected} (the read length; 0 for "
                    "a write)",
                )
        elif msg.data:
            self._broken(
                direction,
                f"DmaCallResult for call {cid} failed with {msg.code.name} but carries "
                f"{len(msg.data)} bytes; a failed result carries no data",
            )

    def _commit_call_result(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, DmaCallResult)
        del self._calls[msg.call_id]

    def _check_change(
        self, direction: Direction, msg: DeviceAddedEvent | DeviceRemovedEvent
    ) -> None:
        """A hot-plug event: the feature, a fresh change id, and the frontend's in-flight cap."""
        cid = msg.change_id
        if HOTPLUG_FEATURE not in self.features:
            self._broken(
                direction,
                f"{type(msg).__name__} needs the {HOTPLUG_FEATURE!r} feature, which was not "
                "negotiated on this connection; a backend announces hot-plug only to "
                "frontends that offered it",
            )
        if cid in self._changes:
            self._broken(
                direction,
                f"hot-plug change id {cid} is still awaiting its acknowledgement; "
                "an acknowledgement could not say which change it answers",
            )
        cap = self._side_limits()[0].max_in_flight
        if len(self._changes) >= cap:
            self._broken(
                direction,
                f"{len(self._changes)} hot-plug changes await acknowledgement and the "
                f"frontend accepts at most {cap} (its max_in_flight); wait for a "
                "DeviceChangeAck first",
                TooManyInFlightError,
            )

    def _check_change_ack(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, DeviceChangeAck)
        cid = msg.change_id
        if cid not in self._changes:
            if direction is _SEND:
                self._broken(
                    direction,
                    f"no hot-plug change {cid} is owed: a DeviceChangeAck acknowledges a "
                    "DeviceAddedEvent/DeviceRemovedEvent received from the backend, once",
                )
            self._broken(
                direction,
                f"the frontend acknowledged hot-plug change {cid}, which is not "
                "outstanding (never announced, or already acknowledged)",
            )

    def _commit_change_ack(self, direction: Direction, msg: Message) -> None:
        assert isinstance(msg, DeviceChangeAck)
        self._changes.discard(msg.change_id)

    # ------------------------------------------------------------------ conveniences

    def hello(self, token: bytes = b"") -> bytes:
        """CLIENT: send the Hello (our version, features, limits, guest and token).

        ``token`` is the guest's secret for ``tcp://`` and ``vsock://``
        backends that ask for one (``token_file`` in the backend config).
        """
        return self.send(self._handshake.make_hello(self._limits, token))

    def check_version(self) -> str | None:
        """SERVER, after the Hello: None if the versions are compatible, else why not.

        The text names both versions (see :func:`version_mismatch_message`);
        send it with ``reject(ErrorCode.VERSION_MISMATCH, text)``.
        """
        return self._handshake.version_problem()

    def accept(
        self, *, features: Iterable[str] | None = None, limits: Limits | None = None
    ) -> bytes:
        """SERVER: answer the Hello with a Welcome, and become OPEN.

        The version is the same major with the lower of both minors; the
        features are those both sides support, in the frontend's order.
        ``features``/``limits`` override the constructor's. Raises
        :class:`LocalProtocolError` if the major versions differ: check
        :meth:`check_version` first and :meth:`reject` instead.
        """
        if self._state is not ConnectionState.HELLO_RECEIVED:
            raise LocalProtocolError(
                f"accept() is for a backend that has received a Hello; state is {self._state.name}"
            )
        welcome = self._handshake.make_welcome(features, self._limits if limits is None else limits)
        return self.send(welcome)

    def reject(self, code: ErrorCode, message: str) -> bytes:
        """SERVER: refuse the Hello with ``code`` and a human-readable ``message``."""
        return self.send(self._handshake.make_rejection(code, message))

    def close(self, code: ErrorCode = ErrorCode.OK, message: str = "") -> bytes:
        """Say Goodbye (with why, if not a normal close); the connection is then CLOSED."""
        return self.send(Goodbye(code, clip_text(message)))

    def send_reply(self, reply: Reply) -> bytes:
        """SERVER: :meth:`send` a reply; one too large for the peer becomes an ErrorReply.

        A guest's limits never make the backend fail: when ``reply`` encodes
        to more than the frontend's ``max_message_size``, the request is
        answered instead with an ``OPERATION_FAILED`` :class:`ErrorReply`
        that says how large the reply was and what the limit is (its text cut
        to fit even the smallest allowed limit). Other refusals still raise.
        """
        try:
            return self.send(reply)
        except MessageTooLargeError as exc:
            text = (
                f"the {type(reply).__name__} for request {reply.request_id} does not fit: {exc}; "
                "announce a larger max_message_size in the Hello, or ask for less (e.g. a "
                "snapshot without config space)"
            )
        limit = self._peer_limits.max_message_size
        room = limit - len(encode(ErrorReply(reply.request_id, ErrorCode.OPERATION_FAILED, "")))
        # msgpack spends at most 3 bytes on a str header; the texts are ASCII.
        return self.send(
            ErrorReply(reply.request_id, ErrorCode.OPERATION_FAILED, clip_text(text, room - 3))
        )

    def error_reply_for(self, err: RemoteProtocolError) -> ErrorReply | None:
        """SERVER: the ErrorReply answering the request ``err`` is about, if answerable.

        Returns None when the error was fatal (the state is ERROR, or no
        request id could be read); the caller then closes the connection.
        """
        request_id = getattr(err, "request_id", None)
        if (
            self._role is not Role.SERVER
            or self._state is not _OPEN
            or not isinstance(request_id, int)
            or request_id not in self._pending
        ):
            return None
        code = err.code if err.code is not ErrorCode.OK else ErrorCode.PROTOCOL_ERROR
        return ErrorReply(request_id, code, clip_text(str(err)))


_Rule = Callable[[Connection, Direction, Message], None]

#: What each kind of message must obey, in either direction (absent: the table alone).
_CHECKS: dict[MessageKind, _Rule] = {
    _K.REQUEST: Connection._check_request,
    _K.REPLY: Connection._check_reply,
    _K.HELLO: Connection._check_hello,
    _K.WELCOME: Connection._check_welcome,
    _K.EVENT: Connection._check_event,
    _K.CALL_RESULT: Connection._check_call_result,
    _K.CHANGE_ACK: Connection._check_change_ack,
}

#: What each kind of message changes once it passed (absent: only the state).
_COMMITS: dict[MessageKind, _Rule] = {
    _K.REQUEST: Connection._commit_request,
    _K.REPLY: Connection._commit_reply,
    _K.HELLO: Connection._commit_hello,
    _K.WELCOME: Connection._commit_welcome,
    _K.HANDSHAKE_REJECTED: Connection._commit_rejection,
    _K.GOODBYE: Connection._commit_goodbye,
    _K.EVENT: Connection._commit_event,
    _K.CALL_RESULT: Connection._commit_call_result,
    _K.CHANGE_ACK: Connection._commit_change_ack,
}

#: What the state table and the rule tables say for one (role, state, direction,
#: message class): its kind, the target state (None: not allowed), its check and its
#: commit. Built on first use from the tables above (which stay the one source), so a
#: message costs one dict lookup here instead of four; bounded by roles x states x
#: directions x message classes.
_Plan = tuple[MessageKind, "ConnectionState | None", "_Rule | None", "_Rule | None"]
_PLANS: dict[tuple[Role, ConnectionState, Direction, type], _Plan] = {}


def _make_plan(key: tuple[Role, ConnectionState, Direction, type]) -> _Plan:
    role, state, direction, cls = key
    kind = message_kind(cls)  # raises for a class that is no message kind: never cached
    plan: _Plan = (
        kind,
        TRANSITIONS.get((role, state, direction, kind)),
        _CHECKS.get(kind),
        _COMMITS.get(kind),
    )
    _PLANS[key] = plan
    return plan
