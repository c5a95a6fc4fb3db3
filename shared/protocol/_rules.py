"""The protocol's rules, each written once and applied in both directions.

The rules in one place
----------------------
Sending and receiving go through the same two steps, :meth:`Connection._check`
then :meth:`Connection._commit` (in ``_connection``). ``_check`` looks the
message up in the state table (``_state.TRANSITIONS``) and applies the rule for
its kind (one table, :data:`_CHECKS`, of the methods of
:class:`ConnectionRules`); each rule is written once and holds in both
directions. Who broke a rule decides the error: when *we* were about to send it, it is a
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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol._messages import (
    HOTPLUG_FEATURE,
    MAX_DMA_CHUNK,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceRemovedEvent,
    DmaCallResult,
    DmaReadCall,
    DmaWriteCall,
    Goodbye,
    HandshakeRejected,
    Hello,
    Limits,
    Message,
    Reply,
    Request,
    Welcome,
)
from shared.protocol._records import DMA_CALL_OVERHEAD, ConnectionRecords
from shared.protocol._state import (
    TRANSITIONS,
    ConnectionState,
    Direction,
    MessageKind,
    Role,
    message_kind,
)

__all__ = [
    "ConnectionRules",
    "PeerOverLimitError",
    "TooManyInFlightError",
    "MessageTooLargeError",
]

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


class ConnectionRules(ConnectionRecords):
    """The rules, by kind of message: a ``_check_*`` and a ``_commit_*`` for each.

    The base of :class:`~shared.protocol._connection.Connection`, which
    applies them through :data:`_CHECKS` and :data:`_COMMITS`.
    """

    __slots__ = ()

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


_Rule = Callable[[ConnectionRules, Direction, Message], None]

#: What each kind of message must obey, in either direction (absent: the table alone).
_CHECKS: dict[MessageKind, _Rule] = {
    _K.REQUEST: ConnectionRules._check_request,
    _K.REPLY: ConnectionRules._check_reply,
    _K.HELLO: ConnectionRules._check_hello,
    _K.WELCOME: ConnectionRules._check_welcome,
    _K.EVENT: ConnectionRules._check_event,
    _K.CALL_RESULT: ConnectionRules._check_call_result,
    _K.CHANGE_ACK: ConnectionRules._check_change_ack,
}

#: What each kind of message changes once it passed (absent: only the state).
_COMMITS: dict[MessageKind, _Rule] = {
    _K.REQUEST: ConnectionRules._commit_request,
    _K.REPLY: ConnectionRules._commit_reply,
    _K.HELLO: ConnectionRules._commit_hello,
    _K.WELCOME: ConnectionRules._commit_welcome,
    _K.HANDSHAKE_REJECTED: ConnectionRules._commit_rejection,
    _K.GOODBYE: ConnectionRules._commit_goodbye,
    _K.EVENT: ConnectionRules._commit_event,
    _K.CALL_RESULT: ConnectionRules._commit_call_result,
    _K.CHANGE_ACK: ConnectionRules._commit_change_ack,
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
