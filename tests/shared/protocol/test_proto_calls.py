"""Connection: interrupt/DMA messages and the backend-call bookkeeping (issue 5)."""

from __future__ import annotations

import msgpack
import pytest
from _proto_samples import open_pair

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol import (
    DMA_CALL_OVERHEAD,
    IRQ_MODE_MSIX,
    MAX_DMA_CHUNK,
    U32,
    Connection,
    ConnectionState,
    DmaCallResult,
    DmaFaultEvent,
    DmaMapRequest,
    DmaReadCall,
    DmaUnmapRequest,
    DmaWriteCall,
    DoneReply,
    InterruptDisableRequest,
    InterruptEnableRequest,
    InterruptEoiRequest,
    InterruptEvent,
    InterruptMaskRequest,
    Limits,
    MalformedMessageError,
    Message,
    Role,
    TooManyInFlightError,
    ValueReply,
    encode,
)

S = ConnectionState


def raw(*items: object) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


def big_pair(
    *, client_in_flight: int = 64, size: int = 2 * MAX_DMA_CHUNK
) -> tuple[Connection, Connection]:
    """A pair whose frame limits admit full MAX_DMA_CHUNK calls both ways."""
    return open_pair(client_limits=Limits(size, client_in_flight), server_limits=Limits(size, 64))


def call(client: Connection, server: Connection, msg: Message) -> Message:
    """The backend sends ``msg``; the frontend receives it."""
    return client.receive(server.send(msg))


# --------------------------------------------------------------------------- requests and events


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (InterruptEnableRequest(1, 0x100, IRQ_MODE_MSIX, 2048, eventfds=True), ValueReply(1, 2048)),
        (InterruptDisableRequest(1, 0x100, IRQ_MODE_MSIX), DoneReply(1)),
        (InterruptEoiRequest(1, 0x100, 0), DoneReply(1)),
        (InterruptMaskRequest(1, 0x100, 0xFFFF, True), DoneReply(1)),
        (DmaMapRequest(1, 4096, writable=True, shared=True), ValueReply(1, 0x1000)),
        (DmaUnmapRequest(1, 0x1000), DoneReply(1)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_interrupt_and_dma_requests_are_ordinary_requests(
    request_: Message, reply: Message
) -> None:
    client, server = open_pair()
    assert server.receive(client.send(request_)) == request_
    assert server.outstanding == frozenset({1})
    assert client.receive(server.send(reply)) == reply
    assert client.outstanding == server.outstanding == frozenset()


def test_interrupt_and_fault_events_flow_backend_to_frontend_only() -> None:
    client, server = open_pair()
    for event in (
        InterruptEvent(0x100, 3, 17),
        DmaFaultEvent(0x100, 0xDEAD_0000, 8, True, "write outside every DMA window"),
    ):
        assert client.receive(server.send(event)) == event
        with pytest.raises(LocalProtocolError, match="frontend cannot send"):
            client.send(event)
    assert client.owed_calls == server.outstanding_calls == frozenset()
    with pytest.raises(RemoteProtocolError, match="frontend sent InterruptEvent"):
        server.receive(encode(InterruptEvent(0x100, 3, 1)))
    assert server.state is S.ERROR


# --------------------------------------------------------------------------- the call round trip


def test_read_call_round_trip_tracks_outstanding_and_owed() -> None:
    client, server = open_pair()
    cid = server.next_call_id()
    got = call(client, server, DmaReadCall(cid, 0x1000, 4))
    assert got == DmaReadCall(cid, 0x1000, 4)
    assert server.outstanding_calls == frozenset({cid})
    assert client.owed_calls == frozenset({cid})
    # Each side's other view stays empty: the roles do not mix.
    assert server.owed_calls == client.outstanding_calls == frozenset()
    # Calls are not requests: they never count as requests in flight.
    assert server.outstanding == client.outstanding == frozenset()

    result = server.receive(client.send(DmaCallResult(cid, ErrorCode.OK, b"abcd")))
    assert result == DmaCallResult(cid, ErrorCode.OK, b"abcd")
    assert server.outstanding_calls == client.owed_calls == frozenset()
    assert (client.state, server.state) == (S.OPEN, S.OPEN)


def test_write_call_round_trip_and_a_fault_result() -> None:
    client, server = open_pair()
    write = DmaWriteCall(server.next_call_id(), 0x2000, b"\x01" * 100)
    fault = DmaReadCall(server.next_call_id(), 0x9000, 8)
    call(client, server, write)
    call(client, server, fault)
    assert server.outstanding_calls == client.owed_calls == {write.call_id, fault.call_id}
    # Results may come back in any order.
    server.receive(client.send(DmaCallResult(fault.call_id, ErrorCode.DMA_FAULT, b"")))
    server.receive(client.send(DmaCallResult(write.call_id, ErrorCode.OK, b"")))
    assert server.outstanding_calls == client.owed_calls == frozenset()


def test_interleaved_requests_and_calls_keep_separate_books() -> None:
    client, server = open_pair()
    server.receive(client.send(DmaUnmapRequest(7, 0x1000)))
    call(client, server, DmaReadCall(7, 0x1000, 1))  # the same number, another space
    server.receive(client.send(DmaCallResult(7, ErrorCode.OK, b"x")))
    assert server.outstanding == frozenset({7})
    client.receive(server.send(DoneReply(7)))
    assert client.outstanding == server.outstanding == server.outstanding_calls == frozenset()


# --------------------------------------------------------------------------- the frontend's rules


def test_client_cannot_answer_a_call_it_does_not_owe() -> None:
    client, server = open_pair()
    with pytest.raises(LocalProtocolError, match="no DMA call 5 is owed"):
        client.send(DmaCallResult(5, ErrorCode.OK, b""))
    call(client, server, DmaWriteCall(5, 0, b"x"))
    client.send(DmaCallResult(5, ErrorCode.OK, b""))
    with pytest.raises(LocalProtocolError, match="no DMA call 5 is owed"):
        client.send(DmaCallResult(5, ErrorCode.OK, b""))  # exactly once
    assert client.state is S.OPEN


@pytest.mark.parametrize(
    ("the_call", "result", "needle"),
    [
        (DmaReadCall(1, 0, 4), DmaCallResult(1, ErrorCode.OK, b"abc"), "carries 3 bytes"),
        (DmaReadCall(1, 0, 4), DmaCallResult(1, ErrorCode.OK, b""), "exactly 4"),
        (DmaWriteCall(1, 0, b"ab"), DmaCallResult(1, ErrorCode.OK, b"ab"), "exactly 0"),
        (DmaReadCall(1, 0, 4), DmaCallResult(1, ErrorCode.DMA_FAULT, b"abcd"), "no data"),
    ],
)
def test_a_result_must_match_its_call_on_both_sides(
    the_call: Message, result: DmaCallResult, needle: str
) -> None:
    client, server = open_pair()
    call(client, server, the_call)
    with pytest.raises(LocalProtocolError, match=needle):
        client.send(result)
    assert client.owed_calls == frozenset({1})  # refused: still owed, nothing changed
    # A frontend that sends it anyway is lying about guest memory: fatal.
    with pytest.raises(RemoteProtocolError, match=needle):
        server.receive(encode(result))
    assert server.state is S.ERROR


def test_backend_reusing_an_owed_call_id_is_fatal_for_the_client() -> None:
    client, _server = open_pair()
    client.receive(encode(DmaReadCall(3, 0, 4)))
    with pytest.raises(RemoteProtocolError, match="reused DMA call id 3"):
        client.receive(encode(DmaWriteCall(3, 0, b"x")))
    assert client.state is S.ERROR


def test_backend_exceeding_the_frontends_in_flight_is_fatal_for_the_client() -> None:
    client, _server = open_pair(client_limits=Limits(65536, 2))
    client.receive(encode(DmaReadCall(1, 0, 4)))
    client.receive(encode(DmaReadCall(2, 0, 4)))
    with pytest.raises(RemoteProtocolError, match="frontend accepts at most 2"):
        client.receive(encode(DmaReadCall(3, 0, 4)))
    assert client.state is S.ERROR


def test_backend_asking_for_a_read_that_cannot_be_answered_is_fatal() -> None:
    client, _server = open_pair()  # the backend accepts 65536-byte frames
    room = 65536 - DMA_CALL_OVERHEAD
    client.receive(encode(DmaReadCall(1, 0, room)))
    with pytest.raises(RemoteProtocolError, match="at most 65504"):
        client.receive(encode(DmaReadCall(2, 0, room + 1)))
    assert client.state is S.ERROR


def test_server_cannot_send_a_call_result_nor_client_a_call() -> None:
    client, server = open_pair()
    with pytest.raises(LocalProtocolError, match="backend cannot send DmaCallResult"):
        server.send(DmaCallResult(1, ErrorCode.OK, b""))
    with pytest.raises(LocalProtocolError, match="frontend cannot send DmaReadCall"):
        client.send(DmaReadCall(1, 0, 1))
    with pytest.raises(LocalProtocolError, match="only the backend"):
        client.next_call_id()
    with pytest.raises(RemoteProtocolError, match="backend sent DmaCallResult"):
        client.receive(encode(DmaCallResult(1, ErrorCode.OK, b"")))
    assert client.state is S.ERROR


def test_call_result_before_the_handshake_is_fatal() -> None:
    server = Connection(Role.SERVER, limits=Limits())
    with pytest.raises(RemoteProtocolError, match="AWAIT_HELLO"):
        server.receive(encode(DmaCallResult(1, ErrorCode.OK, b"")))
    assert server.state is S.ERROR


# --------------------------------------------------------------------------- the backend's rules


def test_server_refuses_a_duplicate_outstanding_call_id() -> None:
    client, server = open_pair()
    call(client, server, DmaReadCall(9, 0, 1))
    with pytest.raises(LocalProtocolError, match="call id 9 is still outstanding"):
        server.send(DmaWriteCall(9, 0, b"x"))
    assert server.outstanding_calls == frozenset({9})
    assert server.state is S.OPEN


@pytest.mark.parametrize("call_id", [0, 4, U32])
def test_result_for_a_call_that_is_not_outstanding_is_fatal(call_id: int) -> None:
    client, server = open_pair()
    call(client, server, DmaReadCall(1, 0, 1))
    with pytest.raises(RemoteProtocolError, match=f"call {call_id}, which is not outstanding"):
        server.receive(encode(DmaCallResult(call_id, ErrorCode.OK, b"")))
    assert server.state is S.ERROR
    assert server.error_reply_for(RemoteProtocolError("x")) is None


def test_second_result_for_the_same_call_is_fatal() -> None:
    client, server = open_pair()
    call(client, server, DmaWriteCall(1, 0, b"x"))
    frame = client.send(DmaCallResult(1, ErrorCode.OK, b""))
    server.receive(frame)
    with pytest.raises(RemoteProtocolError, match="not outstanding"):
        server.receive(frame)
    assert server.state is S.ERROR


def test_malformed_call_result_is_fatal_not_answerable() -> None:
    _client, server = open_pair()
    with pytest.raises(MalformedMessageError) as info:
        server.receive(raw(0x80, 5, ErrorCode.OK.value, "not bytes"))
    assert info.value.request_id is None
    assert server.state is S.ERROR
    assert server.outstanding == frozenset()  # the call id did not become a request id
    assert server.error_reply_for(info.value) is None


def test_outstanding_calls_are_capped_at_the_frontends_max_in_flight() -> None:
    client, server = open_pair(client_limits=Limits(65536, 3))
    ids = [server.next_call_id() for _ in range(3)]
    for cid in ids:
        call(client, server, DmaReadCall(cid, 0, 1))
    with pytest.raises(TooManyInFlightError, match="at most 3") as info:
        server.send(DmaReadCall(server.next_call_id(), 0, 1))
    assert info.value.code is ErrorCode.BUSY
    assert server.outstanding_calls == frozenset(ids)  # refused: nothing changed
    # An answer frees a slot.
    server.receive(client.send(DmaCallResult(ids[1], ErrorCode.OK, b"z")))
    call(client, server, DmaWriteCall(server.next_call_id(), 0, b"y"))
    assert len(server.outstanding_calls) == 3


def test_next_call_id_wraps_and_skips_outstanding() -> None:
    client, server = open_pair()
    assert server.next_call_id() == 1
    call(client, server, DmaReadCall(3, 0, 1))
    assert server.next_call_id() == 2
    assert server.next_call_id() == 4  # 3 is outstanding
    server._next_call_id = U32  # jump to the end of the u32 space
    call(client, server, DmaReadCall(0, 0, 1))
    assert server.next_call_id() == U32
    assert server.next_call_id() == 1  # 0 is outstanding: wrapped past it
    assert server.next_call_id() == 2


def test_read_calls_longer_than_one_result_frame_are_refused() -> None:
    client, server = open_pair()  # both sides accept 65536-byte frames
    assert server.max_dma_chunk == client.max_dma_chunk == 65536 - DMA_CALL_OVERHEAD
    with pytest.raises(LocalProtocolError, match="chunks of at most max_dma_chunk"):
        server.send(DmaReadCall(1, 0, server.max_dma_chunk + 1))
    assert server.outstanding_calls == frozenset()
    call(client, server, DmaReadCall(1, 0, server.max_dma_chunk))
    result = DmaCallResult(1, ErrorCode.OK, b"\x00" * server.max_dma_chunk)
    assert server.receive(client.send(result)) == result


def test_max_dma_chunk_is_the_smaller_of_both_limits_and_of_the_protocol_cap() -> None:
    client, server = open_pair(client_limits=Limits(4096, 8), server_limits=Limits(65536, 8))
    assert client.max_dma_chunk == server.max_dma_chunk == 4096 - DMA_CALL_OVERHEAD
    client, server = big_pair()
    assert client.max_dma_chunk == server.max_dma_chunk == MAX_DMA_CHUNK


def test_full_size_chunks_flow_when_the_limits_allow() -> None:
    client, server = big_pair()
    data = bytes(range(256)) * (MAX_DMA_CHUNK // 256)
    call(client, server, DmaWriteCall(1, 0x1000, data))
    call(client, server, DmaReadCall(2, 0x1000, MAX_DMA_CHUNK))
    server.receive(client.send(DmaCallResult(1, ErrorCode.OK, b"")))
    assert server.receive(client.send(DmaCallResult(2, ErrorCode.OK, data))).data == data  # type: ignore[attr-defined]
    assert server.outstanding_calls == client.owed_calls == frozenset()


def test_write_call_over_the_frontends_frame_limit_is_refused_and_recoverable() -> None:
    client, server = open_pair(client_limits=Limits(1024, 8))
    with pytest.raises(LocalProtocolError, match="accepts at most 1024"):
        server.send(DmaWriteCall(1, 0, b"x" * 1024))
    assert server.outstanding_calls == frozenset()  # nothing registered
    call(client, server, DmaWriteCall(1, 0, b"x" * server.max_dma_chunk))
    assert server.outstanding_calls == frozenset({1})


def test_goodbye_abandons_outstanding_calls() -> None:
    client, server = open_pair()
    call(client, server, DmaReadCall(1, 0, 1))
    server.receive(client.close())
    assert server.state is S.CLOSED
    assert server.outstanding_calls == frozenset({1})  # the caller fails its waiters
    assert "calls=1" in repr(server)
