"""The msgpack codec: exact wire form, round trips, and hostile bytes."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import msgpack
import pytest
from _proto_samples import SAMPLES, messages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol import (
    CALL_RESULT_TAGS,
    MAX_DMA_CHUNK,
    MAX_DMA_WINDOW,
    MAX_MSIX_VECTORS,
    MESSAGE_TYPES,
    U32,
    U64,
    ConfigReadRequest,
    DeviceInfo,
    DmaCallResult,
    DmaReadCall,
    DmaWriteCall,
    ErrorReply,
    Hello,
    InterruptEnableRequest,
    InterruptMaskRequest,
    Limits,
    MalformedMessageError,
    Message,
    PingRequest,
    SnapshotReply,
    UnknownMessageError,
    ValueReply,
    decode,
    encode,
)

BIG = 16 << 20


def raw(*items: Any) -> bytes:
    """Hand-built msgpack, as a hostile peer would send it."""
    return msgpack.packb(list(items), use_bin_type=True)


# --------------------------------------------------------------------------- wire form


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    data = encode(msg)
    assert decode(data, max_size=BIG) == msg
    # The wire form is an array starting with the tag, one element per field.
    wire = msgpack.unpackb(data)
    assert wire[0] == msg.TAG
    assert len(wire) == 1 + len(dataclasses.fields(msg))


def test_config_read_wire_form_is_a_flat_array() -> None:
    assert encode(ConfigReadRequest(7, 0x100, 0x10, 4)) == raw(0x12, 7, 0x100, 0x10, 4)


def test_nested_values_are_arrays_codes_are_ints_bytes_are_bin() -> None:
    hello = Hello(1, 2, ("a", "b"), Limits(4096, 8), "g")
    assert msgpack.unpackb(encode(hello)) == [0x01, 1, 2, ["a", "b"], [4096, 8], "g", b""]
    err = ErrorReply(9, ErrorCode.BUSY, "later")
    assert msgpack.unpackb(encode(err)) == [0x43, 9, 7, "later"]
    dev = DeviceInfo(1, 2, 3, 4, 5, 6, 7, 8, bytes(64))
    wire = msgpack.unpackb(encode(SnapshotReply(1, (dev,))), raw=False)
    assert wire == [0x40, 1, [[1, 2, 3, 4, 5, 6, 7, 8, bytes(64), []]]]
    sized = DeviceInfo(1, 2, 3, 4, 5, 6, 7, 8, None, (4096, 0, 0, 0, 0, 16, 2048))
    assert msgpack.unpackb(encode(SnapshotReply(1, (sized,))))[2][0][-1] == [
        4096, 0, 0, 0, 0, 16, 2048
    ]
    # bytes travel as msgpack bin (0xc4 = bin 8), never as str
    assert b"\xc4\x40" + bytes(64) in encode(SnapshotReply(1, (dev,)))


def test_interrupt_and_dma_wire_forms() -> None:
    assert encode(InterruptEnableRequest(1, 0x100, 2, 2048, eventfds=True)) == raw(
        0x17, 1, 0x100, 2, 2048, True
    )
    assert encode(InterruptMaskRequest(2, 0x100, 0xFFFF, False)) == raw(
        0x1A, 2, 0x100, 0xFFFF, False
    )
    assert encode(DmaReadCall(3, 0x1000, 64)) == raw(0x62, 3, 0x1000, 64)
    # DMA data is msgpack bin, and the call result's code is its integer.
    assert msgpack.unpackb(encode(DmaWriteCall(4, 0x2000, b"ab"))) == [0x63, 4, 0x2000, b"ab"]
    assert msgpack.unpackb(encode(DmaCallResult(4, ErrorCode.DMA_FAULT, b""))) == [0x80, 4, 13, b""]
    assert DmaCallResult.TAG in CALL_RESULT_TAGS


def test_the_largest_dma_chunk_round_trips() -> None:
    chunk = bytes(range(256)) * (MAX_DMA_CHUNK // 256)
    for msg in (DmaWriteCall(U32, U64, chunk), DmaCallResult(1, ErrorCode.OK, chunk)):
        data = encode(msg)
        assert len(data) <= MAX_DMA_CHUNK + 32
        assert decode(data, max_size=len(data)) == msg
        # ... and the receiver's size limit still applies before unpacking.
        with pytest.raises(MalformedMessageError, match="exceeds the"):
            decode(data, max_size=len(data) - 1)


def test_decoded_error_code_is_the_enum() -> None:
    msg = decode(encode(ErrorReply(1, ErrorCode.NOT_FOUND, "x")), max_size=BIG)
    assert isinstance(msg, ErrorReply)
    assert msg.code is ErrorCode.NOT_FOUND


def test_encode_refuses_unregistered_classes() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Stray(PingRequest):
        TAG: ClassVar[int] = 0x3E

    with pytest.raises(LocalProtocolError, match="not a message type registered"):
        encode(Stray(1))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(ValueReply(1, 2))
    assert decode(bytearray(data), max_size=BIG) == ValueReply(1, 2)  # type: ignore[arg-type]
    assert decode(memoryview(data), max_size=BIG) == ValueReply(1, 2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hostile bytes

NESTED_BOMB = b"\x91" * 5000 + b"\x00"

HOSTILE: list[tuple[str, bytes, str]] = [
    ("empty", b"", "truncated"),
    ("truncated array", encode(ConfigReadRequest(7, 1, 2, 4))[:-1], "truncated"),
    ("truncated str", raw(0x04, 0, "hello")[:-2], "truncated"),
    ("trailing garbage", encode(PingRequest(1)) + b"\x00", "trailing"),
    ("two messages", encode(PingRequest(1)) * 2, "trailing"),
    ("reserved byte 0xc1", b"\xc1", "undecodable"),
    ("not an array", msgpack.packb(5), "array"),
    ("empty array", raw(), "array"),
    ("map", msgpack.packb({"tag": 1}), "undecodable"),
    ("empty map", b"\x80", "array"),
    ("ext type", msgpack.packb(msgpack.ExtType(1, b"x")), "undecodable"),
    ("zero-length ext", b"\x91\xc7\x00\x05", "ext"),
    ("timestamp ext", b"\x91\xd6\xff\x00\x00\x00\x01", "undecodable"),
    ("str tag", raw("ping", 1), "tag must be an integer"),
    ("bool tag", raw(True, 1), "tag must be an integer"),
    ("nil tag", raw(None, 1), "tag must be an integer"),
    ("unknown control tag", raw(0x0F), "unknown message type 0xf"),
    ("unknown tag", raw(0x7F), "unknown message type"),
    ("negative tag", raw(-1), "unknown message type"),
    ("too few fields", raw(0x12, 7, 1, 2), "takes 4 fields, got 3"),
    ("too many fields", raw(0x12, 7, 1, 2, 4, 5), "takes 4 fields, got 5"),
    ("bool where int", raw(0x12, 7, 1, 2, True), "expected an integer, got bool"),
    ("float where int", raw(0x12, 7, 1, 2.0, 4), "expected an integer, got float"),
    ("nil where int", raw(0x41, 7, None), "expected an integer, got nil"),
    ("negative int", raw(0x12, 7, -1, 2, 4), "device must be an integer"),
    ("int64 min", raw(0x41, 7, -(1 << 63)), "value must be an integer"),
    ("request id over u32", raw(0x10, 1 << 32), "request_id must be an integer"),
    ("offset out of range", raw(0x12, 7, 1, 0x1000, 4), "offset"),
    ("bad access size", raw(0x12, 7, 1, 0, 3), "size must be one of"),
    ("value wider than size", raw(0x13, 7, 1, 0, 1, 0x100), "value must be"),
    ("str where bytes", raw(0x40, 1, [[1, 2, 3, 4, 5, 6, 7, 8, "x" * 64, []]]), "bytes"),
    ("bytes where str", raw(0x04, 0, b"bye"), "expected a string, got bytes"),
    ("config of bad length", raw(0x40, 1, [[1, 2, 3, 4, 5, 6, 7, 8, b"x", []]]), "config"),
    ("device info short", raw(0x40, 1, [[1, 2, 3]]), "DeviceInfo as an array of 10"),
    ("devices not an array", raw(0x40, 1, 5), "array of DeviceInfo"),
    ("bar sizes not ints", raw(0x40, 1, [[1, 2, 3, 4, 5, 6, 7, 8, None, ["x"]]]), "integers"),
    ("bar size not a power of 2", raw(0x40, 1, [[1, 2, 3, 4, 5, 6, 7, 8, None, [3] * 7]]), "power"),
    ("bar sizes of bad length", raw(0x40, 1, [[1, 2, 3, 4, 5, 6, 7, 8, None, [16]]]), "0 or 7"),
    ("bool where bool wanted is fine but int is not", raw(0x11, 1, 1), "expected a boolean"),
    ("unknown error code", raw(0x43, 1, 999, "x"), "unknown error code 999"),
    ("error code OK in ErrorReply", raw(0x43, 1, 0, "x"), "must not be OK"),
    ("limits not an array", raw(0x01, 1, 0, [], 65536, "g", b""), "Limits"),
    ("limits out of range", raw(0x01, 1, 0, [], [1, 1], "g", b""), "max_message_size"),
    ("features not strings", raw(0x01, 1, 0, [1], [65536, 8], "g", b""), "array of strings"),
    ("bad guest name", raw(0x01, 1, 0, [], [65536, 8], "a b", b""), "guest"),
    ("empty guest name", raw(0x01, 1, 0, [], [65536, 8], "", b""), "guest"),
    ("token too long", raw(0x01, 1, 0, [], [65536, 8], "g", b"x" * 257), "token"),
    ("token not bytes", raw(0x01, 1, 0, [], [65536, 8], "g", "secret"), "token"),
    ("invalid utf-8", b"\x93\x04\x00\xa2\xff\xfe", "UTF-8"),
    ("huge str header", b"\x93\x04\x00\xdb\xff\xff\xff\xff", "undecodable"),
    ("huge bin header", b"\x93\x04\x00\xc6\xff\xff\xff\xff", "undecodable"),
    ("huge array header", b"\xdd\xff\xff\xff\xff", "undecodable"),
    ("long text", raw(0x04, 0, "x" * 5000), "exceeds max_str_len"),
    ("long config image", raw(0x40, 1, [[1, 2, 3, 4, 5, 6, 7, 8, b"x" * 5000, []]]), "config"),
    ("long bin", raw(0x63, 1, 0, b"x" * (MAX_DMA_CHUNK + 1)), "exceeds max_bin_len"),
    ("huge bin header in a DMA call", b"\x94\x63\x01\x00\xc6\xff\xff\xff\xff", "undecodable"),
    ("bin header past the end", b"\x94\x63\x01\x00\xc6\x00\x10\x00\x00" + b"x" * 10, "truncated"),
    # ---- interrupts and DMA
    ("irq mode out of range", raw(0x17, 1, 0x100, 3, 1, False), "mode must be"),
    ("irq mode negative", raw(0x18, 1, 0x100, -1), "mode must be"),
    ("zero vectors", raw(0x17, 1, 0x100, 2, 0, False), "vectors must be"),
    ("too many vectors", raw(0x17, 1, 0x100, 2, MAX_MSIX_VECTORS + 1, False), "vectors must be"),
    ("eventfds not a bool", raw(0x17, 1, 0x100, 2, 4, 1), "expected a boolean"),
    ("eoi vector out of range", raw(0x19, 1, 0x100, MAX_MSIX_VECTORS), "vector must be"),
    ("mask vector between table and function mask", raw(0x1A, 1, 0x100, 0xFFFE, True), "vector"),
    ("mask flag not a bool", raw(0x1A, 1, 0x100, 0, "yes"), "expected a boolean"),
    ("dma map of zero bytes", raw(0x1B, 1, 0, True, False), "size must be"),
    ("dma map over the window limit", raw(0x1B, 1, MAX_DMA_WINDOW + 1, True, False), "size"),
    ("dma map flags not bools", raw(0x1B, 1, 4096, 1, 0), "expected a boolean"),
    ("dma unmap address a float", raw(0x1C, 1, 4096.0), "expected an integer, got float"),
    ("dma unmap address negative", raw(0x1C, 1, -4096), "bus_address must be"),
    ("interrupt count zero", raw(0x60, 0x100, 0, 0), "count must be"),
    ("interrupt count over u32", raw(0x60, 0x100, 0, 1 << 32), "count must be"),
    ("fault message bytes", raw(0x61, 0x100, 0, 4, False, b"x"), "expected a string"),
    ("fault is_write int", raw(0x61, 0x100, 0, 4, 1, "x"), "expected a boolean"),
    ("read call id over u32", raw(0x62, 1 << 32, 0, 4), "call_id must be"),
    ("read call id negative", raw(0x62, -1, 0, 4), "call_id must be"),
    ("read call of zero bytes", raw(0x62, 1, 0, 0), "length must be"),
    ("read call over the chunk", raw(0x62, 1, 0, MAX_DMA_CHUNK + 1), "length must be"),
    ("read call id a bool", raw(0x62, True, 0, 4), "expected an integer, got bool"),
    ("write call of no data", raw(0x63, 1, 0, b""), "data must be"),
    ("write call data as str", raw(0x63, 1, 0, "abcd"), "expected bytes"),
    ("write call data as array", raw(0x63, 1, 0, [1, 2, 3]), "expected bytes"),
    ("write call data nil", raw(0x63, 1, 0, None), "expected bytes"),
    ("call result id over u32", raw(0x80, 1 << 32, 0, b""), "call_id must be"),
    ("call result unknown code", raw(0x80, 1, 999, b""), "unknown error code 999"),
    ("call result data as str", raw(0x80, 1, 0, "data"), "expected bytes"),
    ("call result too few fields", raw(0x80, 1, 0), "takes 3 fields, got 2"),
    ("call result over the chunk", raw(0x80, 1, 0, b"x" * (MAX_DMA_CHUNK + 1)), "max_bin_len"),
    ("unknown call result tag", raw(0x9F, 1, 0, b""), "unknown message type 0x9f"),
    ("long array", raw(0x01, 1, 0, ["a"] * 300, [65536, 8], "g", b""), "exceeds max_array_len"),
    ("nested depth bomb", NESTED_BOMB, "nested too deeply"),
    ("deep but legal depth", b"\x91" * 500 + b"\x00", "tag must be an integer"),
    ("deep value", raw(0x41, 1, [[[[[[[[1]]]]]]]]), "expected an integer, got tuple"),
    ("deep text", b"\x93\x04\x00" + b"\x91" * 900 + b"\xc0", "expected a string, got tuple"),
]


@pytest.mark.parametrize(
    ("data", "needle"), [(d, n) for _, d, n in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_input_gives_remote_protocol_error(data: bytes, needle: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data, max_size=BIG)
    assert isinstance(info.value, MalformedMessageError)
    assert needle.lower() in str(info.value).lower()


def test_oversized_frame_rejected_before_unpacking() -> None:
    data = encode(ErrorReply(1, ErrorCode.BUSY, "x" * 400))
    with pytest.raises(MalformedMessageError, match=r"exceeds the 256-byte limit") as info:
        decode(data, max_size=256)
    assert info.value.request_id is None
    assert decode(data, max_size=len(data)) == ErrorReply(1, ErrorCode.BUSY, "x" * 400)


def test_non_bytes_frame_is_rejected() -> None:
    with pytest.raises(MalformedMessageError, match="must be bytes"):
        decode(12, max_size=BIG)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- answerable errors


def test_malformed_request_exposes_its_id_and_a_precise_code() -> None:
    with pytest.raises(MalformedMessageError) as info:
        decode(raw(0x12, 77, 1, 0, 3), max_size=BIG)
    assert info.value.request_id == 77
    assert info.value.tag == 0x12
    assert info.value.code is ErrorCode.INVALID_SIZE

    with pytest.raises(MalformedMessageError) as info:
        decode(raw(0x12, 78, 1, 0x2000, 4), max_size=BIG)
    assert (info.value.request_id, info.value.code) == (78, ErrorCode.INVALID_OFFSET)

    with pytest.raises(MalformedMessageError) as info:
        decode(raw(0x14, 79, 1, 9, 0, 4), max_size=BIG)
    assert (info.value.request_id, info.value.code) == (79, ErrorCode.NOT_FOUND)

    with pytest.raises(MalformedMessageError) as info:
        decode(raw(0x12, 80, "dev", 0, 4), max_size=BIG)
    assert (info.value.request_id, info.value.code) == (80, ErrorCode.PROTOCOL_ERROR)


def test_unknown_operation_is_distinguishable_and_answerable() -> None:
    with pytest.raises(UnknownMessageError, match="unknown operation 0x1f") as info:
        decode(raw(0x1F, 5, "whatever", [1, 2]), max_size=BIG)
    assert info.value.request_id == 5
    assert info.value.tag == 0x1F
    assert info.value.code is ErrorCode.NOT_IMPLEMENTED


@pytest.mark.parametrize(
    "data",
    [
        raw(0x1F),  # no id at all
        raw(0x1F, -1),  # id out of u32 range
        raw(0x1F, 1 << 32),
        raw(0x1F, True),  # bool is not an id
        raw(0x41, 5, None),  # a reply: ids of replies are not "answerable"
        raw(0x7E, 5),  # an unknown event
        raw(0x80, 5, 999, b""),  # a call result: its call id is not a request id
        raw(0x80, 5, 0, "x"),
        raw(0x9F, 5),  # an unknown call result
    ],
)
def test_no_request_id_when_it_cannot_be_trusted(data: bytes) -> None:
    with pytest.raises(MalformedMessageError) as info:
        decode(data, max_size=BIG)
    assert info.value.request_id is None


# --------------------------------------------------------------------------- properties

# Decoding runs a few hundred times per example at most; keep examples cheap.
fuzz = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode(data, max_size=BIG)
    except RemoteProtocolError as exc:
        assert isinstance(exc, MalformedMessageError)
        assert str(exc)
    else:
        assert type(msg) in MESSAGE_TYPES.values()
        assert encode(msg) == data  # a valid decode is canonical: it re-encodes identically


@fuzz
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    _decode_or_protocol_error(data)


@fuzz
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_valid_frames_decode_or_raise_protocol_error(
    msg: Message, data: st.DataObject
) -> None:
    frame = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if action == "flip" and frame:
            frame[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set" and frame:
            frame[pos] = data.draw(st.integers(0, 255))
        elif action == "insert":
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and frame:
            del frame[pos]
        elif action == "truncate":
            del frame[pos:]
    mutated = bytes(frame)
    try:
        decode(mutated, max_size=BIG)
    except RemoteProtocolError as exc:
        assert isinstance(exc, MalformedMessageError)


@fuzz
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(1 << 63), (1 << 64) - 1)
        | st.floats()
        | st.text(max_size=20)
        | st.binary(max_size=20),
        lambda inner: st.lists(inner, max_size=6),
        max_leaves=30,
    ).flatmap(lambda tail: st.tuples(st.integers(-2, 0x80), st.just(tail)))
)
def test_structured_garbage_decodes_or_raises_protocol_error(item: tuple[int, Any]) -> None:
    tag, tail = item
    fields = tail if isinstance(tail, list) else [tail]
    _decode_or_protocol_error(raw(tag, *fields))


@settings(max_examples=300, deadline=None)
@given(messages)
def test_generated_messages_round_trip(msg: Message) -> None:
    assert decode(encode(msg), max_size=BIG) == msg


def test_hello_token_is_an_optional_trailing_field() -> None:
    # A 1.0 frontend's Hello has no token: it still decodes, with an empty one.
    old = decode(raw(0x01, 1, 0, [], [65536, 8], "g"), max_size=BIG)
    assert isinstance(old, Hello) and old.token == b""
    new = decode(raw(0x01, 1, 0, [], [65536, 8], "g", b"secret"), max_size=BIG)
    assert isinstance(new, Hello) and new.token == b"secret"
    assert "secret" not in repr(new)
    with pytest.raises(RemoteProtocolError, match=r"Hello \(tag 0x01\) takes 5-6 fields, got 7"):
        decode(raw(0x01, 1, 0, [], [65536, 8], "g", b"", 1), max_size=BIG)
    with pytest.raises(RemoteProtocolError, match="takes 5-6 fields, got 4"):
        decode(raw(0x01, 1, 0, [], [65536, 8]), max_size=BIG)
