"""Connection: a client and a server joined through plain bytes, no I/O."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import ClassVar

import msgpack
import pytest
from _proto_samples import open_pair

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol import (
    MESSAGE_TYPES,
    PRE_HANDSHAKE_LIMITS,
    U32,
    ConfigReadRequest,
    Connection,
    ConnectionState,
    DeviceInfo,
    DoneReply,
    ErrorReply,
    Event,
    Goodbye,
    HandshakeRejected,
    Hello,
    Limits,
    MalformedMessageError,
    MessageTooLargeError,
    PeerOverLimitError,
    PingRequest,
    Role,
    SnapshotReply,
    TooManyInFlightError,
    UnknownMessageError,
    ValueReply,
    Welcome,
    decode,
    encode,
)

S = ConnectionState


def raw(*items: object) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


def client_conn(**kw: object) -> Connection:
    kw.setdefault("guest", "guest0")
    return Connection(Role.CLIENT, limits=kw.pop("limits", Limits()), **kw)  # type: ignore[arg-type]


def server_conn(**kw: object) -> Connection:
    return Connection(Role.SERVER, limits=kw.pop("limits", Limits()), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- handshake


def test_full_handshake_negotiates_everything() -> None:
    client = client_conn(
        features=["batch", "events", "irq"], limits=Limits(8192, 16), version=(1, 3)
    )
    server = server_conn(
        features=["irq", "batch", "dma"], limits=Limits(1 << 20, 128), version=(1, 1)
    )
    assert (client.state, server.state) == (S.START, S.AWAIT_HELLO)
    assert client.peer_limits == PRE_HANDSHAKE_LIMITS

    hello = server.receive(client.hello())
    assert isinstance(hello, Hello)
    assert (client.state, server.state) == (S.HELLO_SENT, S.HELLO_RECEIVED)
    assert server.guest == "guest0"
    assert server.peer_limits == Limits(8192, 16)
    assert server.check_version() is None

    welcome = client.receive(server.accept())
    assert isinstance(welcome, Welcome)
    assert (client.state, server.state) == (S.OPEN, S.OPEN)
    # same major, lower minor; intersection of features in the frontend's order
    assert client.version == server.version == (1, 1)
    assert client.features == server.features == ("batch", "irq")
    assert client.peer_limits == Limits(1 << 20, 128)
    assert client.guest == server.guest == "guest0"


def test_accept_can_override_features_and_limits() -> None:
    client = client_conn(features=["a", "b"])
    server = server_conn(features=["a", "b"])
    server.receive(client.hello())
    client.receive(server.accept(features=["b"], limits=Limits(4096, 2)))
    assert client.features == ("b",)
    assert client.peer_limits == Limits(4096, 2)
    assert server.limits == Limits(4096, 2)  # what was announced is enforced


@pytest.mark.parametrize(("front", "back"), [((2, 0), (1, 0)), ((1, 4), (2, 1))])
def test_major_version_mismatch_is_refused_naming_both_versions(
    front: tuple[int, int], back: tuple[int, int]
) -> None:
    client = client_conn(version=front)
    server = server_conn(version=back)
    server.receive(client.hello())
    problem = server.check_version()
    assert problem is not None
    assert f"frontend speaks {front[0]}.{front[1]}" in problem
    assert f"backend speaks {back[0]}.{back[1]}" in problem
    assert "upgrade the " + ("backend" if front > back else "frontend") in problem
    with pytest.raises(LocalProtocolError, match="frontend speaks"):
        server.accept()
    assert server.state is S.HELLO_RECEIVED  # a refused accept changes nothing

    rejection = client.receive(server.reject(ErrorCode.VERSION_MISMATCH, problem))
    assert isinstance(rejection, HandshakeRejected)
    assert client.rejection == rejection
    assert (rejection.version_major, rejection.version_minor) == back
    assert rejection.code is ErrorCode.VERSION_MISMATCH
    assert f"frontend speaks {front[0]}.{front[1]}" in rejection.message
    assert f"backend speaks {back[0]}.{back[1]}" in rejection.message
    assert (client.state, server.state) == (S.CLOSED, S.CLOSED)


def test_client_refuses_welcome_with_another_major_naming_both_versions() -> None:
    client = client_conn(version=(1, 0))
    client.hello()
    rogue = Welcome(2, 0, (), Limits(), "guest0")
    with pytest.raises(RemoteProtocolError, match=r"frontend speaks 1\.0, backend speaks 2\.0"):
        client.receive(encode(rogue))
    assert client.state is S.ERROR


@pytest.mark.parametrize(
    ("welcome", "needle"),
    [
        (Welcome(1, 5, (), Limits(), "guest0"), "newer than"),
        (Welcome(1, 0, ("secret",), Limits(), "guest0"), "did not offer"),
        (Welcome(1, 0, (), Limits(), "guest1"), "frontend asked for 'guest0'"),
    ],
)
def test_client_refuses_inconsistent_welcome(welcome: Welcome, needle: str) -> None:
    client = client_conn(version=(1, 2), features=["a"])
    client.hello()
    with pytest.raises(RemoteProtocolError, match=needle):
        client.receive(encode(welcome))
    assert client.state is S.ERROR


def test_server_refuses_to_send_inconsistent_welcome() -> None:
    server = server_conn(features=["a"])
    server.receive(client_conn(features=["a"], version=(1, 0)).hello())
    for bad, needle in [
        (Welcome(1, 1, (), Limits(), "guest0"), r"at most 1\.0"),
        (Welcome(1, 0, ("b",), Limits(), "guest0"), "did not offer"),
        (Welcome(1, 0, (), Limits(), "other"), "asked for 'guest0'"),
    ]:
        with pytest.raises(LocalProtocolError, match=needle):
            server.send(bad)
    assert server.state is S.HELLO_RECEIVED
    server.send(Welcome(1, 0, ("a",), Limits(), "guest0"))
    assert server.state is S.OPEN

    older = server_conn(version=(1, 0))
    older.receive(client_conn(version=(1, 2)).hello())
    with pytest.raises(LocalProtocolError, match=r"at most 1\.0"):
        older.send(Welcome(1, 1, (), Limits(), "guest0"))  # newer than the backend speaks


def test_unknown_guest_is_rejected() -> None:
    known = {"guest0"}
    client = client_conn(guest="intruder")
    server = server_conn()
    hello = server.receive(client.hello())
    assert isinstance(hello, Hello)
    assert hello.guest not in known
    frame = server.reject(
        ErrorCode.UNKNOWN_GUEST, f"guest {hello.guest!r} is not in the backend's config"
    )
    rejection = client.receive(frame)
    assert isinstance(rejection, HandshakeRejected)
    assert rejection.code is ErrorCode.UNKNOWN_GUEST
    assert "'intruder'" in rejection.message
    assert (client.state, server.state) == (S.CLOSED, S.CLOSED)
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        client.send(PingRequest(1))


def test_hello_needs_a_guest_and_explicit_hello_must_match_it() -> None:
    with pytest.raises(LocalProtocolError, match="guest="):
        Connection(Role.CLIENT, limits=Limits()).hello()
    client = client_conn(guest="guest0")
    with pytest.raises(LocalProtocolError, match="this connection is for 'guest0'"):
        client.send(Hello(1, 0, (), Limits(), "guest1"))
    explicit = Connection(Role.CLIENT, limits=Limits())
    explicit.send(Hello(1, 0, ("x",), Limits(4096, 4), "g"))
    assert explicit.guest == "g"
    assert explicit.limits == Limits(4096, 4)


def test_long_reject_text_is_clipped_not_refused() -> None:
    client, server = client_conn(), server_conn()
    server.receive(client.hello())
    rejection = client.receive(server.reject(ErrorCode.ACCESS_DENIED, "x" * 5000))
    assert isinstance(rejection, HandshakeRejected)
    assert len(rejection.message) == 1024
    assert rejection.message.endswith("...")


# --------------------------------------------------------------------------- requests and replies


def test_many_requests_in_flight_answered_out_of_order() -> None:
    client, server = open_pair(server_limits=Limits(65536, 64))
    sent = {}
    frames = []
    for offset in range(0, 64 * 4, 4):
        rid = client.next_request_id()
        sent[rid] = offset
        frames.append(client.send(ConfigReadRequest(rid, 0x100, offset % 0x1000, 4)))
    assert client.requests_in_flight == 64
    received = [server.receive(f) for f in frames]
    assert server.outstanding == frozenset(sent)

    random.Random(1234).shuffle(received)
    for req in received:
        assert isinstance(req, ConfigReadRequest)
        reply = client.receive(server.send(ValueReply(req.request_id, req.offset * 2)))
        assert isinstance(reply, ValueReply)
        assert reply.value == sent[reply.request_id] * 2
    assert client.outstanding == server.outstanding == frozenset()


def test_every_request_gets_exactly_one_reply() -> None:
    client, server = open_pair()
    server.receive(client.send(PingRequest(5)))
    done = server.send(DoneReply(5))
    with pytest.raises(LocalProtocolError, match="no request 5 is outstanding"):
        server.send(DoneReply(5))
    with pytest.raises(LocalProtocolError, match="no request 6 is outstanding"):
        server.send(ErrorReply(6, ErrorCode.BUSY, "x"))
    client.receive(done)
    assert server.state is client.state is S.OPEN


def test_reply_to_unknown_id_is_a_remote_error() -> None:
    client, _server = open_pair()
    with pytest.raises(RemoteProtocolError, match="request 42, which is not outstanding"):
        client.receive(encode(ValueReply(42, 1)))
    assert client.state is S.ERROR


def test_second_reply_to_answered_id_is_a_remote_error() -> None:
    client, server = open_pair()
    server.receive(client.send(PingRequest(1)))
    reply = server.send(DoneReply(1))
    client.receive(reply)
    with pytest.raises(RemoteProtocolError, match="already answered"):
        client.receive(reply)
    assert client.state is S.ERROR


def test_client_cannot_reuse_an_outstanding_id() -> None:
    client, _server = open_pair()
    client.send(PingRequest(9))
    with pytest.raises(LocalProtocolError, match="request id 9 is still outstanding"):
        client.send(ConfigReadRequest(9, 0, 0, 4))
    assert client.outstanding == frozenset({9})


def test_duplicate_request_id_from_peer_is_fatal() -> None:
    client, server = open_pair()
    frame = client.send(PingRequest(9))
    server.receive(frame)
    with pytest.raises(RemoteProtocolError, match="reused request id 9"):
        server.receive(frame)
    assert server.state is S.ERROR
    with pytest.raises(LocalProtocolError):
        server.send(DoneReply(9))  # nothing but a courtesy Goodbye after ERROR
    server.close(ErrorCode.PROTOCOL_ERROR, "request id 9 reused")
    assert server.state is S.ERROR


def test_next_request_id_wraps_and_skips_outstanding() -> None:
    client, _server = open_pair()
    first = client.next_request_id()
    client.send(PingRequest(first + 1))
    assert client.next_request_id() == first + 2  # skipped the outstanding id
    client.send(PingRequest(0))
    client._next_id = U32  # jump near the wrap (no public way to burn 4 billion ids)
    assert client.next_request_id() == U32
    assert client.next_request_id() == 1  # wrapped past the outstanding 0


# --------------------------------------------------------------------------- limits


def test_client_waits_when_the_servers_in_flight_limit_is_reached() -> None:
    client, server = open_pair(server_limits=Limits(65536, 2))
    a = client.send(PingRequest(client.next_request_id()))
    client.send(PingRequest(client.next_request_id()))
    with pytest.raises(TooManyInFlightError, match="at most 2") as info:
        client.send(PingRequest(client.next_request_id()))
    assert info.value.code is ErrorCode.BUSY
    assert client.requests_in_flight == 2
    req = server.receive(a)
    client.receive(server.send(DoneReply(req.request_id)))  # type: ignore[attr-defined]
    client.send(PingRequest(client.next_request_id()))
    assert client.requests_in_flight == 2


def test_server_answers_busy_when_peer_ignores_its_limit() -> None:
    client, server = open_pair(server_limits=Limits(65536, 1))
    server.receive(client.send(PingRequest(1)))
    with pytest.raises(PeerOverLimitError, match="accepts 1 at once") as info:
        server.receive(encode(PingRequest(2)))  # a client that ignored our limit
    assert info.value.request_id == 2
    assert server.state is S.OPEN
    assert server.requests_in_flight == 2
    reply = server.error_reply_for(info.value)
    assert reply is not None
    assert (reply.request_id, reply.code) == (2, ErrorCode.BUSY)
    server.send(reply)
    assert server.outstanding == frozenset({1})


def test_oversized_frame_from_peer_is_fatal() -> None:
    _client, server = open_pair(server_limits=Limits(256, 8))
    oversized = encode(SnapshotReply(1, (DeviceInfo(1, 2, 3, 4, 5, 6, 7, 8, bytes(256)),)))
    with pytest.raises(MalformedMessageError, match="exceeds the 256-byte limit") as info:
        server.receive(oversized)
    assert server.state is S.ERROR
    assert server.error_reply_for(info.value) is None


def test_sending_over_the_peers_size_limit_is_refused_and_recoverable() -> None:
    client, server = open_pair(client_limits=Limits(1024, 8))
    server.receive(client.send(PingRequest(3)))
    too_big = SnapshotReply(3, (DeviceInfo(1, 2, 3, 4, 5, 6, 7, 8, bytes(4096)),))
    with pytest.raises(MessageTooLargeError, match="accepts at most 1024"):
        server.send(too_big)
    assert server.outstanding == frozenset({3})  # still owed a reply
    reply = client.receive(server.send(ErrorReply(3, ErrorCode.OPERATION_FAILED, "too big")))
    assert isinstance(reply, ErrorReply)
    assert client.outstanding == frozenset()


def test_client_refuses_to_send_frames_over_the_servers_limit() -> None:
    client, _server = open_pair(server_limits=Limits(256, 8))
    with pytest.raises(MessageTooLargeError):
        client.send(Goodbye(ErrorCode.OK, "x" * 300))
    assert client.state is S.OPEN


# --------------------------------------------------------------------------- bad requests


def test_malformed_request_with_readable_id_is_answered() -> None:
    client, server = open_pair()
    with pytest.raises(MalformedMessageError) as info:
        server.receive(raw(0x12, 77, 0x100, 0x10, 3))  # size 3 does not exist
    assert server.state is S.OPEN
    reply = server.error_reply_for(info.value)
    assert reply == ErrorReply(77, ErrorCode.INVALID_SIZE, str(info.value))
    server.send(reply)
    assert server.outstanding == frozenset()
    # and the connection keeps serving
    req = server.receive(client.send(PingRequest(client.next_request_id())))
    client.receive(server.send(DoneReply(req.request_id)))  # type: ignore[attr-defined]


def test_unknown_operation_is_answered_not_implemented() -> None:
    _client, server = open_pair()
    with pytest.raises(UnknownMessageError) as info:
        server.receive(raw(0x1F, 12, "future", "fields"))
    reply = server.error_reply_for(info.value)
    assert reply is not None
    assert reply.code is ErrorCode.NOT_IMPLEMENTED
    assert reply.message == "unknown operation 0x1f"
    assert server.state is S.OPEN


def test_undecodable_frame_without_id_is_fatal() -> None:
    _client, server = open_pair()
    with pytest.raises(MalformedMessageError) as info:
        server.receive(b"\xc1garbage")
    assert server.state is S.ERROR
    assert server.error_reply_for(info.value) is None
    bye = server.close(ErrorCode.PROTOCOL_ERROR, str(info.value))
    assert isinstance(decode(bye, max_size=1 << 20), Goodbye)
    with pytest.raises(LocalProtocolError, match="ERROR"):
        server.receive(encode(PingRequest(1)))


def test_malformed_request_reusing_an_outstanding_id_is_fatal() -> None:
    client, server = open_pair()
    server.receive(client.send(PingRequest(4)))
    with pytest.raises(MalformedMessageError) as info:
        server.receive(raw(0x12, 4, 0, 0, 3))
    assert server.state is S.ERROR
    assert server.error_reply_for(info.value) is None


def test_malformed_reply_is_fatal_for_the_client() -> None:
    client, _server = open_pair()
    client.send(PingRequest(1))
    with pytest.raises(MalformedMessageError) as info:
        client.receive(raw(0x41, 1, "not an int"))
    assert client.state is S.ERROR
    assert client.error_reply_for(info.value) is None


def test_malformed_request_before_the_handshake_is_fatal() -> None:
    server = server_conn()
    with pytest.raises(MalformedMessageError):
        server.receive(raw(0x12, 1, 0, 0, 3))
    assert server.state is S.ERROR


# --------------------------------------------------------------------------- illegal transitions


@pytest.mark.parametrize(
    ("make", "msg", "needle"),
    [
        (
            client_conn,
            PingRequest(1),
            "frontend cannot send PingRequest while the connection is START",
        ),
        (client_conn, Welcome(1, 0, (), Limits(), "g"), "cannot send Welcome"),
        (client_conn, HandshakeRejected(ErrorCode.BUSY, "", 1, 0), "cannot send HandshakeRejected"),
        (client_conn, DoneReply(1), "cannot send DoneReply"),
        (server_conn, Hello(1, 0, (), Limits(), "g"), "backend cannot send Hello"),
        (server_conn, Welcome(1, 0, (), Limits(), "g"), "AWAIT_HELLO"),
        (server_conn, PingRequest(1), "cannot send PingRequest"),
        (server_conn, DoneReply(1), "cannot send DoneReply"),
    ],
)
def test_illegal_sends_before_the_handshake(make: object, msg: object, needle: str) -> None:
    conn = make()  # type: ignore[operator]
    before = conn.state
    with pytest.raises(LocalProtocolError, match=needle):
        conn.send(msg)
    assert conn.state is before


def test_illegal_sends_when_open() -> None:
    client, server = open_pair()
    for conn, msg in [
        (client, Hello(1, 0, (), Limits(), "guest0")),
        (client, DoneReply(1)),
        (server, Welcome(1, 0, (), Limits(), "guest0")),
        (server, PingRequest(1)),
        (server, HandshakeRejected(ErrorCode.BUSY, "", 1, 0)),
    ]:
        with pytest.raises(LocalProtocolError, match="cannot send"):
            conn.send(msg)
        assert conn.state is S.OPEN
    with pytest.raises(LocalProtocolError, match="accept"):
        server.accept()
    with pytest.raises(LocalProtocolError):
        client.send("not a message")  # type: ignore[arg-type]


def test_client_may_not_pipeline_requests_before_welcome() -> None:
    client = client_conn()
    client.hello()
    with pytest.raises(LocalProtocolError, match="HELLO_SENT"):
        client.send(PingRequest(1))


@pytest.mark.parametrize(
    ("setup", "msg", "needle"),
    [
        ("fresh-server", PingRequest(1), "frontend sent PingRequest"),
        ("fresh-server", Welcome(1, 0, (), Limits(), "g"), "sent Welcome"),
        ("hello-received", PingRequest(1), "HELLO_RECEIVED"),
        ("hello-received", Hello(1, 0, (), Limits(), "guest0"), "sent Hello"),
        ("open-server", Hello(1, 0, (), Limits(), "guest0"), "sent Hello"),
        ("open-server", DoneReply(1), "sent DoneReply"),
        ("fresh-client", Welcome(1, 0, (), Limits(), "guest0"), "START"),
        ("hello-sent", DoneReply(1), "HELLO_SENT"),
        ("open-client", PingRequest(1), "backend sent PingRequest"),
        ("open-client", Welcome(1, 0, (), Limits(), "guest0"), "sent Welcome"),
    ],
)
def test_illegal_receives_are_fatal_remote_errors(setup: str, msg: object, needle: str) -> None:
    if setup == "fresh-server":
        conn = server_conn()
    elif setup == "hello-received":
        conn = server_conn()
        conn.receive(client_conn().hello())
    elif setup == "open-server":
        conn = open_pair()[1]
    elif setup == "fresh-client":
        conn = client_conn()
    elif setup == "hello-sent":
        conn = client_conn()
        conn.hello()
    else:
        conn = open_pair()[0]
    with pytest.raises(RemoteProtocolError, match=needle):
        conn.receive(encode(msg))  # type: ignore[arg-type]
    assert conn.state is S.ERROR


# --------------------------------------------------------------------------- goodbye


def test_goodbye_from_client_closes_both_sides() -> None:
    client, server = open_pair()
    bye = server.receive(client.close())
    assert isinstance(bye, Goodbye)
    assert bye.code is ErrorCode.OK
    assert server.peer_goodbye == bye
    assert (client.state, server.state) == (S.CLOSED, S.CLOSED)
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        server.receive(encode(PingRequest(1)))
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        server.send(Goodbye(ErrorCode.OK, ""))


def test_goodbye_from_server_carries_the_reason() -> None:
    client, server = open_pair()
    client.send(PingRequest(1))
    bye = client.receive(server.close(ErrorCode.BUSY, "backend shutting down"))
    assert bye == Goodbye(ErrorCode.BUSY, "backend shutting down")
    assert client.state is S.CLOSED
    assert client.outstanding == frozenset({1})  # abandoned; the caller fails its waiters


def test_goodbye_during_the_handshake() -> None:
    server = server_conn()
    client = client_conn()
    client.receive(server.close(ErrorCode.BUSY, "too many connections"))
    assert (client.state, server.state) == (S.CLOSED, S.CLOSED)
    client2, server2 = client_conn(), server_conn()
    server2.receive(client2.hello())
    server2.receive(client2.close())
    assert server2.state is S.CLOSED


# --------------------------------------------------------------------------- events


@dataclasses.dataclass(frozen=True, slots=True)
class _TestEvent(Event):
    """A stand-in until later issues add real events (interrupts, hot-plug)."""

    TAG: ClassVar[int] = 0x7F
    device: int = 0


@pytest.fixture
def test_event() -> Iterator[type[_TestEvent]]:
    MESSAGE_TYPES[_TestEvent.TAG] = _TestEvent
    try:
        yield _TestEvent
    finally:
        del MESSAGE_TYPES[_TestEvent.TAG]


def test_events_flow_backend_to_frontend_only_when_open(test_event: type[_TestEvent]) -> None:
    client, server = open_pair()
    client.send(PingRequest(1))
    event = client.receive(server.send(test_event(7)))
    assert event == test_event(7)
    assert client.outstanding == frozenset({1})  # events never count as replies
    with pytest.raises(LocalProtocolError, match="frontend cannot send _TestEvent"):
        client.send(test_event(1))
    with pytest.raises(RemoteProtocolError, match="frontend sent _TestEvent"):
        server.receive(encode(test_event(1)))

    early = server_conn()
    with pytest.raises(LocalProtocolError, match="AWAIT_HELLO"):
        early.send(test_event(1))
    waiting = client_conn()
    waiting.hello()
    with pytest.raises(RemoteProtocolError, match="HELLO_SENT"):
        waiting.receive(encode(test_event(1)))


def test_unregistered_event_tag_is_fatal_for_the_client() -> None:
    client, _server = open_pair()
    with pytest.raises(UnknownMessageError, match="unknown message type 0x7f"):
        client.receive(raw(0x7F, 1))
    assert client.state is S.ERROR


def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(LocalProtocolError, match="role"):
        Connection("client", limits=Limits())  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="limits"):
        Connection(Role.CLIENT, limits=65536)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="version"):
        Connection(Role.CLIENT, limits=Limits(), version=(1, -1))
    with pytest.raises(LocalProtocolError, match="features"):
        Connection(Role.CLIENT, limits=Limits(), features=[1])  # type: ignore[list-item]
    conn = Connection(Role.SERVER, limits=Limits(), features=["a", "a", "b"])
    assert "SERVER AWAIT_HELLO" in repr(conn)
