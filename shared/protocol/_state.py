"""The connection state machine, as tables (one module, like h11's ``_state``).

Everything a connection may do is one entry of :data:`TRANSITIONS`, keyed by
``(role, state, direction, kind)`` and giving the next state. Anything not in
the table is illegal: on *send* it is the caller's bug
(:class:`LocalProtocolError`), on *receive* it is the peer's
(:class:`RemoteProtocolError`, and the connection moves to ``ERROR``).

The state diagram in ``docs/protocol.md`` is :func:`render_state_diagram`'s
output, and a test keeps the two identical.
"""

from __future__ import annotations

import enum

from shared.errors import LocalProtocolError
from shared.protocol._messages import (
    DeviceChangeAck,
    DmaCallResult,
    Event,
    Goodbye,
    HandshakeRejected,
    Hello,
    Message,
    Reply,
    Request,
    Welcome,
)

__all__ = [
    "Role",
    "ConnectionState",
    "Direction",
    "MessageKind",
    "INITIAL_STATE",
    "TERMINAL_STATES",
    "LIVE_STATES",
    "TRANSITIONS",
    "message_kind",
    "next_state",
    "render_state_diagram",
]


class Role(enum.Enum):
    """Which end of a connection. The frontend is the CLIENT, the backend the SERVER."""

    CLIENT = "client"
    SERVER = "server"

    # Members are singletons compared by identity, so the identity hash is exact and
    # C-fast; Enum's own __hash__ is Python code, called for every state-table lookup.
    __hash__ = object.__hash__

    @property
    def side(self) -> str:
        """Project vocabulary for this role: ``"frontend"`` or ``"backend"``."""
        return "frontend" if self is Role.CLIENT else "backend"

    @property
    def peer_side(self) -> str:
        """The other end's name: ``"backend"`` for a CLIENT, ``"frontend"`` for a SERVER."""
        return "backend" if self is Role.CLIENT else "frontend"


class ConnectionState(enum.Enum):
    """States of one end of a connection."""

    START = "start"  # CLIENT: nothing sent yet
    HELLO_SENT = "hello_sent"  # CLIENT: waiting for Welcome / HandshakeRejected
    AWAIT_HELLO = "await_hello"  # SERVER: nothing received yet
    HELLO_RECEIVED = "hello_received"  # SERVER: must answer with Welcome or HandshakeRejected
    OPEN = "open"  # handshake done: requests, replies and events flow
    CLOSED = "closed"  # Goodbye or rejection sent/received: stop, close the transport
    ERROR = "error"  # the peer broke the protocol: only a courtesy Goodbye may follow

    # Members are singletons compared by identity, so the identity hash is exact and
    # C-fast; Enum's own __hash__ is Python code, called for every state-table lookup.
    __hash__ = object.__hash__


class Direction(enum.Enum):
    """Whether this end sends or receives the message."""

    SEND = "send"
    RECEIVE = "receive"

    # Members are singletons compared by identity, so the identity hash is exact and
    # C-fast; Enum's own __hash__ is Python code, called for every state-table lookup.
    __hash__ = object.__hash__


class MessageKind(enum.Enum):
    """What the state machine cares about in a message: its role in the protocol."""

    HELLO = "Hello"
    WELCOME = "Welcome"
    HANDSHAKE_REJECTED = "HandshakeRejected"
    GOODBYE = "Goodbye"
    REQUEST = "Request"
    REPLY = "Reply"
    EVENT = "Event"
    #: The frontend's one answer to a backend call (DmaReadCall/DmaWriteCall,
    #: which are events), matched by ``call_id``.
    CALL_RESULT = "CallResult"
    #: The frontend's one acknowledgement of a hot-plug event
    #: (DeviceAddedEvent/DeviceRemovedEvent, which are events), matched by ``change_id``.
    CHANGE_ACK = "ChangeAck"

    # Members are singletons compared by identity, so the identity hash is exact and
    # C-fast; Enum's own __hash__ is Python code, called for every state-table lookup.
    __hash__ = object.__hash__


_CLIENT, _SERVER = Role.CLIENT, Role.SERVER
_SEND, _RECV = Direction.SEND, Direction.RECEIVE
_S = ConnectionState
_K = MessageKind

INITIAL_STATE: dict[Role, ConnectionState] = {_CLIENT: _S.START, _SERVER: _S.AWAIT_HELLO}

#: States after which nothing more is received; the caller closes the transport.
TERMINAL_STATES: frozenset[ConnectionState] = frozenset({_S.CLOSED, _S.ERROR})

#: The whole protocol. (role, state, direction, kind) -> next state.
TRANSITIONS: dict[tuple[Role, ConnectionState, Direction, MessageKind], ConnectionState] = {
    # ---- frontend (CLIENT)
    (_CLIENT, _S.START, _SEND, _K.HELLO): _S.HELLO_SENT,
    (_CLIENT, _S.HELLO_SENT, _RECV, _K.WELCOME): _S.OPEN,
    (_CLIENT, _S.HELLO_SENT, _RECV, _K.HANDSHAKE_REJECTED): _S.CLOSED,
    (_CLIENT, _S.OPEN, _SEND, _K.REQUEST): _S.OPEN,
    (_CLIENT, _S.OPEN, _RECV, _K.REPLY): _S.OPEN,
    (_CLIENT, _S.OPEN, _RECV, _K.EVENT): _S.OPEN,
    # Backend calls (DmaReadCall/DmaWriteCall) arrive as events; the answer
    # goes back frontend -> backend, only while OPEN.
    (_CLIENT, _S.OPEN, _SEND, _K.CALL_RESULT): _S.OPEN,
    # Hot-plug events arrive as events; each is acknowledged, only while OPEN.
    (_CLIENT, _S.OPEN, _SEND, _K.CHANGE_ACK): _S.OPEN,
    # ---- backend (SERVER)
    (_SERVER, _S.AWAIT_HELLO, _RECV, _K.HELLO): _S.HELLO_RECEIVED,
    (_SERVER, _S.HELLO_RECEIVED, _SEND, _K.WELCOME): _S.OPEN,
    (_SERVER, _S.HELLO_RECEIVED, _SEND, _K.HANDSHAKE_REJECTED): _S.CLOSED,
    (_SERVER, _S.OPEN, _RECV, _K.REQUEST): _S.OPEN,
    (_SERVER, _S.OPEN, _SEND, _K.REPLY): _S.OPEN,
    # Events flow backend -> frontend only, never before the handshake.
    (_SERVER, _S.OPEN, _SEND, _K.EVENT): _S.OPEN,
    (_SERVER, _S.OPEN, _RECV, _K.CALL_RESULT): _S.OPEN,
    (_SERVER, _S.OPEN, _RECV, _K.CHANGE_ACK): _S.OPEN,
    # Hot-plug is per device and needs no state of its own: unlike Xen's
    # xenbus (Reconfiguring/Reconfigured multiplexed with the whole
    # connection's state), a DeviceAddedEvent/DeviceRemovedEvent and its
    # DeviceChangeAck are one event and one acknowledgement in OPEN, while
    # requests and replies for every other device keep flowing.
}

#: States in which a connection is alive (not yet CLOSED or ERROR), per role.
LIVE_STATES: dict[Role, tuple[ConnectionState, ...]] = {
    _CLIENT: (_S.START, _S.HELLO_SENT, _S.OPEN),
    _SERVER: (_S.AWAIT_HELLO, _S.HELLO_RECEIVED, _S.OPEN),
}

# Goodbye: either side may say it from any live state, and either side may
# receive it; both end the connection. (A backend that is shutting down may
# say Goodbye to a frontend that has not even sent its Hello yet.)
for _role, _states in LIVE_STATES.items():
    for _state in _states:
        TRANSITIONS[(_role, _state, _SEND, _K.GOODBYE)] = _S.CLOSED
        TRANSITIONS[(_role, _state, _RECV, _K.GOODBYE)] = _S.CLOSED
    # After the peer broke the protocol we may still tell it why (a Goodbye).
    TRANSITIONS[(_role, _S.ERROR, _SEND, _K.GOODBYE)] = _S.ERROR

_KINDS: dict[type, MessageKind] = {
    Hello: _K.HELLO,
    Welcome: _K.WELCOME,
    HandshakeRejected: _K.HANDSHAKE_REJECTED,
    Goodbye: _K.GOODBYE,
    DmaCallResult: _K.CALL_RESULT,
    DeviceChangeAck: _K.CHANGE_ACK,
}


def message_kind(msg: Message | type[Message]) -> MessageKind:
    """The :class:`MessageKind` of a message (instance or class).

    Raises :class:`LocalProtocolError` for a type that is none of the kinds.
    """
    cls = msg if isinstance(msg, type) else type(msg)
    kind = _KINDS.get(cls)
    if kind is not None:
        return kind
    for base, base_kind in ((Request, _K.REQUEST), (Reply, _K.REPLY), (Event, _K.EVENT)):
        if issubclass(cls, base):
            _KINDS[cls] = base_kind  # cache: the hot path is one dict lookup
            return base_kind
    raise LocalProtocolError(
        f"{cls.__name__} is not a protocol message kind (Hello, Welcome, HandshakeRejected, "
        "Goodbye, DmaCallResult, DeviceChangeAck, or a Request/Reply/Event subclass)"
    )


def next_state(
    role: Role, state: ConnectionState, direction: Direction, kind: MessageKind
) -> ConnectionState | None:
    """The state after ``role`` in ``state`` sends/receives ``kind``; None if illegal."""
    return TRANSITIONS.get((role, state, direction, kind))


# --------------------------------------------------------------------------- rendering


def _edges(role: Role) -> dict[tuple[ConnectionState, ConnectionState], list[str]]:
    edges: dict[tuple[ConnectionState, ConnectionState], list[str]] = {}
    for (r, state, direction, kind), target in TRANSITIONS.items():
        if r is not role:
            continue
        verb = "send" if direction is _SEND else "recv"
        edges.setdefault((state, target), []).append(f"{verb} {kind.value}")
    return edges


def render_state_diagram() -> str:
    """Render :data:`TRANSITIONS` as Markdown: a mermaid diagram and a table per role.

    The output is deterministic (table order), so ``docs/protocol.md`` can
    embed it verbatim and a test can compare the two.
    """
    out: list[str] = []
    for role in Role:
        out.append(f"#### {role.name} ({role.side})")
        out.append("")
        out.append("```mermaid")
        out.append("stateDiagram-v2")
        out.append(f"    [*] --> {INITIAL_STATE[role].name}")
        for (source, target), labels in _edges(role).items():
            out.append(f"    {source.name} --> {target.name}: {', '.join(labels)}")
        for state in LIVE_STATES[role]:
            out.append(f"    {state.name} --> ERROR: peer breaks the protocol")
        for state in sorted(TERMINAL_STATES, key=lambda s: s.name):
            out.append(f"    {state.name} --> [*]")
        out.append("```")
        out.append("")
        out.append("| State | Direction | Message | Next state |")
        out.append("|---|---|---|---|")
        for (r, state, direction, kind), target in TRANSITIONS.items():
            if r is role:
                out.append(f"| {state.name} | {direction.value} | {kind.value} | {target.name} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
