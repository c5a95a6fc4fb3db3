"""The sans-I/O connection: bytes in, messages out; messages in, bytes out.

A :class:`Connection` never touches a socket or a clock. The caller moves the
bytes :meth:`Connection.send` returns to its transport, and hands every frame
it receives to :meth:`Connection.receive`. The connection enforces both sides'
limits and keeps the exactly-one-reply-per-request bookkeeping; the handshake
(versions, features, guest) lives apart in ``_handshake``.

The connection's state bookkeeping (roles, limits, ids in flight) is
:class:`~shared.protocol._records.ConnectionRecords`, and its rules (what
each kind of message must obey and what it changes, and which errors are
fatal or answerable) are :class:`~shared.protocol._rules.ConnectionRules`.
This module holds the one path through which every message passes, and the
conveniences built on it.

After the end
-------------
Once the connection is ``CLOSED`` or ``ERROR`` the table allows nothing but a
courtesy Goodbye. A backend that still holds replies (computed before the
guest's Goodbye or fatal frame arrived) or events asks :meth:`Connection.can_send`
and drops them, counting them, rather than calling :meth:`Connection.send`,
which would rightly raise.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol._codec import MalformedMessageError, decode, encode
from shared.protocol._handshake import clip_text, version_mismatch_message
from shared.protocol._messages import ErrorReply, Goodbye, Limits, Message, Reply
from shared.protocol._records import DMA_CALL_OVERHEAD, PRE_HANDSHAKE_LIMITS
from shared.protocol._rules import (
    _PLANS,
    ConnectionRules,
    MessageTooLargeError,
    PeerOverLimitError,
    TooManyInFlightError,
    _make_plan,
    _Plan,
)
from shared.protocol._state import (
    TERMINAL_STATES,
    TRANSITIONS,
    ConnectionState,
    Direction,
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

_OPEN = ConnectionState.OPEN
_ERROR = ConnectionState.ERROR
_SEND = Direction.SEND
_RECV = Direction.RECEIVE


class Connection(ConnectionRules):
    """One end of a pcisplit connection, with no I/O.

    ``role`` is :attr:`Role.CLIENT` (frontend) or :attr:`Role.SERVER`
    (backend). ``limits`` are what *this* side accepts: they are announced in
    the Hello/Welcome and enforced on every received frame. ``features`` are
    the optional features this side supports. ``guest`` is the guest name a
    client asks to act as. ``version`` is the protocol version this side
    speaks (tests use it to simulate other releases).
    """

    __slots__ = ()

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

