"""The sans-I/O connection: bytes in, messages out; messages in, bytes out.

A :class:`Connection` never touches a socket or a clock. The caller moves the
bytes :meth:`Connection.send` returns to its transport, and hands every frame
it receives to :meth:`Connection.receive`. The connection checks each step
against the tables in ``_state``, enforces both sides' limits, and keeps the
exactly-one-reply-per-request bookkeeping.

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

from collections.abc import Iterable

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol._codec import MalformedMessageError, decode, encode
from shared.protocol._messages import (
    HOTPLUG_FEATURE,
    MAX_DMA_CHUNK,
    MAX_TEXT_LEN,
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
    request with an :class:`ErrorReply` instead (the id is still outstanding).
    """


def version_mismatch_message(frontend: tuple[int, int], backend: tuple[int, int]) -> str:
    """The text both sides show when the major versions differ. Names both versions."""
    (fmaj, fmin), (bmaj, bmin) = frontend, backend
    if fmaj > bmaj:
        advice = (
            f"upgrade the backend (pciback) to a release that speaks {fmaj}.x, "
            f"or use a frontend that speaks {bmaj}.x"
        )
    else:
        advice = (
            f"upgrade the frontend (pcifront) to a release that speaks {bmaj}.x, "
            f"or use a backend that speaks {fmaj}.x"
        )
    return (
        f"protocol version mismatch: frontend speaks {fmaj}.{fmin}, backend speaks "
        f"{bmaj}.{bmin}; no common major version: {advice}"
    )


def _clip(text: str) -> str:
    # Wire texts are bounded; a long diagnostic is cut rather than refused.
    return text if len(text) <= MAX_TEXT_LEN else text[: MAX_TEXT_LEN - 3] + "..."


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
        "_features",
        "_limits",
        "_local_version",
        "_next_call_id",
        "_next_change_id",
        "_next_id",
        "_offered",
        "_peer_limits",
        "_pending",
        "_role",
        "_state",
        "_version",
        "guest",
        "peer_goodbye",
        "peer_hello",
        "rejection",
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
        self._offered: tuple[str, ...] = offered
        self._local_version: tuple[int, int] = (version[0], version[1])
        self._peer_limits = PRE_HANDSHAKE_LIMITS
        self._version: tuple[int, int] | None = None
        self._features: tuple[str, ...] = ()
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
        #: The guest this connection acts for: requested (client) / claimed (server).
        self.guest: str | None = guest
        #: SERVER: the Hello the frontend sent.
        self.peer_hello: Hello | None = None
        #: CLIENT: the rejection the backend sent, if it refused the handshake.
        self.rejection: HandshakeRejected | None = None
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
    def local_version(self) -> tuple[int, int]:
        """The protocol version this side speaks."""
        return self._local_version

    @property
    def version(self) -> tuple[int, int] | None:
        """The negotiated version once OPEN, else None."""
        return self._version

    @property
    def features(self) -> tuple[str, ...]:
        """The negotiated features (both sides support them); empty before OPEN."""
        return self._features

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
        rid = self._next_id
        while rid in self._pending:
            rid = (rid + 1) & U32
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
    def max_dma_chunk(self) -> int:
        """The largest ``data``/``length`` one DMA call may carry on this connection.

        :data:`MAX_DMA_CHUNK`, lowered so that a DmaWriteCall fits the peer's
        ``max_message_size`` and a DmaCallResult fits ours (before the
        handshake the peer's limits are the defaults). A backend splits
        message-based DMA into chunks of at most this many bytes.
        """
        smallest = min(self._limits.max_message_size, self._peer_limits.max_message_size)
        return min(MAX_DMA_CHUNK, smallest - DMA_CALL_OVERHEAD)

    def next_call_id(self) -> int:
        """SERVER: a fresh call id: a wrapping u32 counter that skips outstanding ids."""
        if self._role is not Role.SERVER:
            raise LocalProtocolError(
                "only the backend (SERVER) makes calls; a frontend answers them with "
                "DmaCallResult using the call id it received"
            )
        cid = self._next_call_id
        while cid in self._calls:
            cid = (cid + 1) & U32
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
        cid = self._next_change_id
        while cid in self._changes:
            cid = (cid + 1) & U32
        self._next_change_id = (cid + 1) & U32
        return cid

    def __repr__(self) -> str:
        return (
            f"<Connection {self._role.name} {self._state.name} guest={self.guest!r} "
            f"in_flight={len(self._pending)} calls={len(self._calls)}>"
        )

    # ------------------------------------------------------------------ sending

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
        :class:`TooManyInFlightError`; a read longer than
        :attr:`max_dma_chunk` is refused). A CLIENT may send a DmaCallResult
        only for an owed call id, once, with exactly the read length of data
        on success (none for a write) and no data on failure.
        """
        kind = message_kind(msg)
        target = TRANSITIONS.get((self._role, self._state, _SEND, kind))
        if target is None:
            raise LocalProtocolError(
                f"a {self._role.side} cannot send {type(msg).__name__} while the connection "
                f"is {self._state.name}"
            )
        # Validate everything before changing anything: a refused send leaves
        # the connection exactly as it was.
        if isinstance(msg, Request):
            self._check_request_send(msg)
        elif isinstance(msg, Reply):
            if msg.request_id not in self._pending:
                raise LocalProtocolError(
                    f"no request {msg.request_id} is outstanding: every request gets exactly "
                    "one reply, and only requests the frontend sent can be answered"
                )
        elif isinstance(msg, Hello):
            if self.guest is not None and msg.guest != self.guest:
                raise LocalProtocolError(
                    f"Hello names guest {msg.guest!r} but this connection is for {self.guest!r}"
                )
        elif isinstance(msg, Welcome):
            self._check_welcome_send(msg)
        elif isinstance(msg, DmaReadCall | DmaWriteCall):
            self._check_call_send(msg)
        elif isinstance(msg, DmaCallResult):
            self._check_call_result(msg, self._calls.get(msg.call_id), LocalProtocolError)
        elif isinstance(msg, DeviceAddedEvent | DeviceRemovedEvent | DeviceChangeAck):
            self._check_change(msg, LocalProtocolError)

        data = encode(msg)
        limit = self._peer_limits.max_message_size
        if len(data) > limit:
            raise MessageTooLargeError(
                f"{type(msg).__name__} encodes to {len(data)} bytes; the "
                f"{self._role.peer_side} accepts at most {limit}"
            )

        if isinstance(msg, Request):
            self._pending.add(msg.request_id)
        elif isinstance(msg, Reply):
            self._pending.discard(msg.request_id)
        elif isinstance(msg, Hello):
            # What we announce is what we enforce and what we negotiate from.
            self._limits = msg.limits
            self._offered = msg.features
            self._local_version = (msg.version_major, msg.version_minor)
            self.guest = msg.guest
        elif isinstance(msg, Welcome):
            self._limits = msg.limits
            self._version = (msg.version_major, msg.version_minor)
            self._features = msg.features
        elif isinstance(msg, DmaReadCall):
            self._calls[msg.call_id] = msg.length
        elif isinstance(msg, DmaWriteCall):
            self._calls[msg.call_id] = 0
        elif isinstance(msg, DmaCallResult):
            del self._calls[msg.call_id]
        elif isinstance(msg, DeviceAddedEvent | DeviceRemovedEvent):
            self._changes.add(msg.change_id)
        elif isinstance(msg, DeviceChangeAck):
            self._changes.discard(msg.change_id)
        self._state = target
        return data

    def _check_call_send(self, msg: DmaReadCall | DmaWriteCall) -> None:
        if msg.call_id in self._calls:
            raise LocalProtocolError(
                f"call id {msg.call_id} is still outstanding; use next_call_id()"
            )
        cap = self._peer_limits.max_in_flight
        if len(self._calls) >= cap:
            raise TooManyInFlightError(
                f"{len(self._calls)} DMA calls await results and the frontend accepts at most "
                f"{cap}; wait for a DmaCallResult before calling again"
            )
        if isinstance(msg, DmaReadCall) and msg.length > self.max_dma_chunk:
            raise LocalProtocolError(
                f"DmaReadCall of {msg.length} bytes: the result would not fit in one frame on "
                f"this connection; split the read into chunks of at most max_dma_chunk "
                f"({self.max_dma_chunk}) bytes"
            )

    def _check_call_result(
        self,
        msg: DmaCallResult,
        expected: int | None,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        """The rules a DmaCallResult obeys, checked by the sender and the receiver alike.

        ``expected`` is the OK data length of the call it answers (None when
        no such call is outstanding/owed). ``error`` is the class to raise:
        Local on send (our bug), Remote on receive (the frontend's).
        """
        if expected is None:
            if self._role is Role.CLIENT:
                text = (
                    f"no DMA call {msg.call_id} is owed: a DmaCallResult answers a "
                    "DmaReadCall/DmaWriteCall received from the backend, exactly once"
                )
            else:
                text = (
                    f"the frontend answered DMA call {msg.call_id}, which is not outstanding "
                    "(never made, or already answered)"
                )
            raise error(text)
        if msg.code is ErrorCode.OK:
            if len(msg.data) != expected:
                raise error(
                    f"DmaCallResult for call {msg.call_id} carries {len(msg.data)} bytes, but "
                    f"a successful result must carry exactly {expected} (the read length; "
                    "0 for a write)"
                )
        elif msg.data:
            raise error(
                f"DmaCallResult for call {msg.call_id} failed with {msg.code.name} but "
                f"carries {len(msg.data)} bytes; a failed result carries no data"
            )

    def _check_change(
        self,
        msg: DeviceAddedEvent | DeviceRemovedEvent | DeviceChangeAck,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        """The hot-plug rules, checked by the sender and the receiver alike.

        ``error`` is Local on send (our bug) and Remote on receive (the
        peer's). The state tables already ensure that only the backend sends
        events and only the frontend acknowledges.
        """
        cid = msg.change_id
        if isinstance(msg, DeviceChangeAck):
            if cid not in self._changes:
                if self._role is Role.CLIENT:
                    raise error(
                        f"no hot-plug change {cid} is owed: a DeviceChangeAck acknowledges a "
                        "DeviceAddedEvent/DeviceRemovedEvent received from the backend, once"
                    )
                raise error(
                    f"the frontend acknowledged hot-plug change {cid}, which is not "
                    "outstanding (never announced, or already acknowledged)"
                )
            return
        if HOTPLUG_FEATURE not in self._features:
            raise error(
                f"{type(msg).__name__} needs the {HOTPLUG_FEATURE!r} feature, which was not "
                "negotiated on this connection; a backend announces hot-plug only to "
                "frontends that offered it"
            )
        if cid in self._changes:
            raise error(
                f"hot-plug change id {cid} is still awaiting its acknowledgement; "
                "an acknowledgement could not say which change it answers"
            )
        cap = (self._peer_limits if self._role is Role.SERVER else self._limits).max_in_flight
        if len(self._changes) >= cap:
            if error is LocalProtocolError:
                raise TooManyInFlightError(
                    f"{len(self._changes)} hot-plug changes await acknowledgement and the "
                    f"frontend accepts at most {cap}; wait for a DeviceChangeAck first"
                )
            raise error(
                f"the backend has more than {cap} hot-plug changes awaiting acknowledgement, "
                "the max_in_flight this frontend announced"
            )

    def _check_request_send(self, msg: Request) -> None:
        if msg.request_id in self._pending:
            raise LocalProtocolError(
                f"request id {msg.request_id} is still outstanding; use next_request_id()"
            )
        if len(self._pending) >= self._peer_limits.max_in_flight:
            raise TooManyInFlightError(
                f"{len(self._pending)} requests are in flight and the backend accepts at most "
                f"{self._peer_limits.max_in_flight}; wait for a reply before sending more"
            )

    def _check_welcome_send(self, msg: Welcome) -> None:
        hello = self.peer_hello
        assert hello is not None  # HELLO_RECEIVED implies a Hello
        problem = self.check_version()
        if problem is not None:
            raise LocalProtocolError(f"cannot accept this frontend: {problem}")
        best_minor = min(self._local_version[1], hello.version_minor)
        if msg.version_major != hello.version_major or msg.version_minor > best_minor:
            raise LocalProtocolError(
                f"Welcome offers version {msg.version_major}.{msg.version_minor}, but the "
                f"negotiated version is at most {hello.version_major}.{best_minor}"
            )
        extra = set(msg.features) - set(hello.features)
        if extra:
            raise LocalProtocolError(
                f"Welcome grants features the frontend did not offer: {sorted(extra)}"
            )
        if msg.guest != hello.guest:
            raise LocalProtocolError(
                f"Welcome names guest {msg.guest!r} but the frontend asked for {hello.guest!r}"
            )

    # ------------------------------------------------------------------ handshake helpers

    def hello(self) -> bytes:
        """CLIENT: send the Hello (our version, features, limits and guest)."""
        if self.guest is None:
            raise LocalProtocolError(
                "a frontend Connection needs guest=... to say which guest it acts as"
            )
        major, minor = self._local_version
        return self.send(Hello(major, minor, self._offered, self._limits, self.guest))

    def check_version(self) -> str | None:
        """SERVER, after the Hello: None if the versions are compatible, else why not.

        The text names both versions (see :func:`version_mismatch_message`);
        send it with ``reject(ErrorCode.VERSION_MISMATCH, text)``.
        """
        hello = self.peer_hello
        if hello is None:
            raise LocalProtocolError("check_version() needs the frontend's Hello first")
        if hello.version_major == self._local_version[0]:
            return None
        return version_mismatch_message(
            (hello.version_major, hello.version_minor), self._local_version
        )

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
        hello = self.peer_hello
        if hello is None or self._state is not ConnectionState.HELLO_RECEIVED:
            raise LocalProtocolError(
                f"accept() is for a backend that has received a Hello; state is {self._state.name}"
            )
        ours = set(self._offered if features is None else features)
        granted = tuple(f for f in hello.features if f in ours)
        minor = min(self._local_version[1], hello.version_minor)
        welcome = Welcome(
            hello.version_major,
            minor,
            granted,
            self._limits if limits is None else limits,
            hello.guest,
        )
        return self.send(welcome)

    def reject(self, code: ErrorCode, message: str) -> bytes:
        """SERVER: refuse the Hello with ``code`` and a human-readable ``message``."""
        major, minor = self._local_version
        return self.send(HandshakeRejected(code, _clip(message), major, minor))

    def close(self, code: ErrorCode = ErrorCode.OK, message: str = "") -> bytes:
        """Say Goodbye (with why, if not a normal close); the connection is then CLOSED."""
        return self.send(Goodbye(code, _clip(message)))

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
        return ErrorReply(request_id, code, _clip(str(err)))

    # ------------------------------------------------------------------ receiving

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

        kind = message_kind(msg)
        target = TRANSITIONS.get((self._role, self._state, _RECV, kind))
        if target is None:
            previous, self._state = self._state, _ERROR
            raise RemoteProtocolError(
                f"the {self._role.peer_side} sent {type(msg).__name__}, which is not allowed "
                f"while this {self._role.side} connection is {previous.name}"
            )
        if isinstance(msg, Request):
            self._on_request(msg)
        elif isinstance(msg, Reply):
            if msg.request_id not in self._pending:
                self._state = _ERROR
                raise RemoteProtocolError(
                    f"the backend replied to request {msg.request_id}, which is not "
                    "outstanding (never sent, or already answered)"
                )
            self._pending.discard(msg.request_id)
        elif isinstance(msg, Hello):
            self.peer_hello = msg
            self.guest = msg.guest
            self._peer_limits = msg.limits
        elif isinstance(msg, Welcome):
            self._on_welcome(msg)
        elif isinstance(msg, HandshakeRejected):
            self.rejection = msg
        elif isinstance(msg, Goodbye):
            self.peer_goodbye = msg
        elif isinstance(msg, DmaReadCall | DmaWriteCall):
            self._on_call(msg)
        elif isinstance(msg, DmaCallResult):
            try:
                self._check_call_result(msg, self._calls.get(msg.call_id), RemoteProtocolError)
            except RemoteProtocolError:
                # The frontend lied about a call: the backend cannot trust
                # anything it says about guest memory any more.
                self._state = _ERROR
                raise
            del self._calls[msg.call_id]
        elif isinstance(msg, DeviceAddedEvent | DeviceRemovedEvent | DeviceChangeAck):
            try:
                self._check_change(msg, RemoteProtocolError)
            except RemoteProtocolError:
                self._state = _ERROR
                raise
            if isinstance(msg, DeviceChangeAck):
                self._changes.discard(msg.change_id)
            else:
                self._changes.add(msg.change_id)
        self._state = target
        return msg

    def _on_call(self, msg: DmaReadCall | DmaWriteCall) -> None:
        problem: str | None = None
        if msg.call_id in self._calls:
            problem = (
                f"the backend reused DMA call id {msg.call_id} while it is still owed a "
                "result; a result could not say which call it answers"
            )
        elif len(self._calls) >= self._limits.max_in_flight:
            problem = (
                f"the backend has more than {self._limits.max_in_flight} DMA calls awaiting "
                "results, the max_in_flight this frontend announced"
            )
        elif isinstance(msg, DmaReadCall):
            room = min(MAX_DMA_CHUNK, self._peer_limits.max_message_size - DMA_CALL_OVERHEAD)
            if msg.length > room:
                problem = (
                    f"the backend asked to read {msg.length} bytes in one DmaReadCall, but a "
                    f"result it accepts holds at most {room}"
                )
        if problem is not None:
            self._state = _ERROR
            raise RemoteProtocolError(problem)
        self._calls[msg.call_id] = msg.length if isinstance(msg, DmaReadCall) else 0

    def _on_request(self, msg: Request) -> None:
        rid = msg.request_id
        if rid in self._pending:
            self._state = _ERROR
            raise RemoteProtocolError(
                f"the frontend reused request id {rid} while it is still outstanding; "
                "a reply could not say which request it answers"
            )
        self._pending.add(rid)
        if len(self._pending) > self._limits.max_in_flight:
            raise PeerOverLimitError(
                f"too many requests in flight: the backend accepts {self._limits.max_in_flight} "
                "at once; wait for replies before sending more",
                request_id=rid,
            )

    def _on_welcome(self, msg: Welcome) -> None:
        local_major, local_minor = self._local_version
        problem: str | None = None
        if msg.version_major != local_major:
            problem = version_mismatch_message(
                self._local_version, (msg.version_major, msg.version_minor)
            )
        elif msg.version_minor > local_minor:
            problem = (
                f"the backend welcomed us with version {msg.version_major}.{msg.version_minor}, "
                f"newer than the {local_major}.{local_minor} this frontend offered"
            )
        elif not set(msg.features) <= set(self._offered):
            problem = (
                "the backend granted features this frontend did not offer: "
                f"{sorted(set(msg.features) - set(self._offered))}"
            )
        elif msg.guest != self.guest:
            problem = f"the backend welcomed guest {msg.guest!r}; we asked for {self.guest!r}"
        if problem is not None:
            self._state = _ERROR
            raise RemoteProtocolError(problem)
        self._version = (msg.version_major, msg.version_minor)
        self._features = msg.features
        self._peer_limits = msg.limits
