"""The codec's fast path against the general codec: same bytes, same message or same error.

The fast decoder and the message validation are both generated from the
``IntField`` declarations in ``_messages``; these properties pin that the
generated code agrees with the general path on every input, valid or hostile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import LocalProtocolError
from shared.protocol import (
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    DoneReply,
    PingRequest,
    ResetRequest,
    ValueReply,
)
from shared.protocol._codec import (
    FAST_PATH_TYPES,
    MalformedMessageError,
    _decode_general,
    _encode_general,
    decode,
    encode,
)

MAX = 65536
HOT = (
    PingRequest, ConfigReadRequest, ConfigWriteRequest, BarReadRequest, BarWriteRequest,
    ResetRequest, ValueReply, DoneReply,
)
HOT_TAGS = [cls.TAG for cls in HOT]

# Integers around every bound the hot messages declare, and the types a hostile peer may send.
_edges = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0xFF, 0x100, 0xFFF, 0x1000, 0xFFFF, 0x10000,
          0xFFFF_FFFF, 0x1_0000_0000, 2**64 - 1]
ints = st.one_of(
    st.sampled_from(_edges),
    st.sampled_from([-1, -(2**63)]),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
values = st.one_of(
    ints, ints, ints, st.booleans(), st.none(), st.floats(allow_nan=False),
    st.text(max_size=4), st.binary(max_size=4), st.lists(ints, max_size=2).map(tuple),
)
tags = st.one_of(st.sampled_from(HOT_TAGS), st.sampled_from([0x10 + 0.0, True, "0x12", 0x43]))
_ARITY = {cls.TAG: len(dataclasses.fields(cls)) for cls in HOT}


def _exact(tag: int) -> st.SearchStrategy[bytes]:
    # The right number of fields, mostly integers: these reach the fast decoder's checks.
    return st.lists(st.one_of(ints, ints, ints, values), min_size=_ARITY[tag],
                    max_size=_ARITY[tag]).map(
        lambda fields: msgpack.packb([tag, *fields], use_bin_type=True)
    )


frames = st.one_of(
    st.builds(
        lambda tag, fields: msgpack.packb([tag, *fields], use_bin_type=True),
        tags,
        st.lists(values, max_size=7),
    ),
    st.sampled_from(HOT_TAGS).flatmap(_exact),
)


def outcome(decoder: Any, data: bytes) -> tuple[Any, ...]:
    try:
        msg = decoder(data, max_size=MAX)
    except MalformedMessageError as exc:
        return ("error", type(exc), str(exc), exc.code, exc.tag, exc.request_id)
    return ("message", type(msg), msg)


def test_the_fast_path_covers_the_hot_messages() -> None:
    assert set(FAST_PATH_TYPES) == set(HOT)


@settings(max_examples=400, deadline=None)
@given(frames)
def test_same_bytes_same_message_or_same_error(data: bytes) -> None:
    assert outcome(decode, data) == outcome(_decode_general, data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_arbitrary_bytes_agree_too(data: bytes) -> None:
    assert outcome(decode, data) == outcome(_decode_general, data)


def _build(cls: type, fields: list[Any]) -> Any:
    try:
        return cls(*fields)
    except (LocalProtocolError, TypeError):
        return None


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(HOT), st.lists(ints, min_size=1, max_size=6))
def test_encoding_is_the_same_bytes_and_round_trips(cls: type, fields: list[int]) -> None:
    msg = _build(cls, fields)
    if msg is None:
        return
    data = encode(msg)
    assert data == _encode_general(msg)
    decoded = decode(data, max_size=MAX)
    assert decoded == msg and type(decoded) is cls


def test_declared_validation_keeps_the_precise_errors() -> None:
    import pytest

    from shared.errors import ErrorCode

    with pytest.raises(LocalProtocolError, match=r"ConfigReadRequest.offset must be an integer "
                       r"in 0..0xfff, got 4096") as info:
        ConfigReadRequest(1, 0, 0x1000, 4)
    assert info.value.code is ErrorCode.INVALID_OFFSET
    with pytest.raises(LocalProtocolError, match=r"size must be one of \(1, 2, 4\), got 8"):
        ConfigWriteRequest(1, 0, 0, 8, 0)
    with pytest.raises(LocalProtocolError, match=r"value must be an integer in 0..0xffff"):
        BarWriteRequest(1, 0, 0, 0, 2, 0x10000)
    with pytest.raises(LocalProtocolError, match="request_id"):
        ValueReply(-1, 0)
    with pytest.raises(LocalProtocolError, match="bar") as info:
        BarReadRequest(1, 0, 6, 0, 4)
    assert info.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(LocalProtocolError, match="size must be one of"):
        ConfigReadRequest(1, 0, 0, True)  # a bool is not a size
