"""A hostile peer writes impossible values into shared memory (XSA-155 and friends)."""

from __future__ import annotations

import struct

import pytest

from shared.ring import (
    RingConsumer,
    RingCorruptError,
    RingProducer,
    RingSpec,
    initialise_ring,
)

SIZE = 4096
SPEC = RingSpec.standalone(SIZE, max_record=1024)
# Offsets inside struct pcisplit_ring_ctrl (checked by the C _Static_asserts).
PROD, CONS_EVENT, CONS, PROD_EVENT = 0, 4, 64, 68
DATA = SPEC.data_offset


def make(initial: int = 0) -> tuple[bytearray, RingProducer, RingConsumer]:
    buf = bytearray(SPEC.end)
    initialise_ring(buf, SPEC, initial_index=initial)
    return buf, RingProducer(buf, SPEC), RingConsumer(buf, SPEC)


def poke(buf: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<I", buf, offset, value & 0xFFFFFFFF)


def peek(buf: bytearray, offset: int) -> int:
    return int(struct.unpack_from("<I", buf, offset)[0])


def test_producer_index_ahead_by_more_than_the_ring() -> None:
    buf, _, cons = make()
    poke(buf, PROD, SIZE + 8)
    with pytest.raises(RingCorruptError, match="more than the ring size ahead") as info:
        cons.receive_nowait()
    assert info.value.value == SIZE + 8
    # Sticky: the ring stays broken even if the peer "fixes" the index.
    poke(buf, PROD, 0)
    with pytest.raises(RingCorruptError):
        cons.receive_nowait()
    assert cons.broken


def test_producer_index_moving_backwards() -> None:
    buf, prod, cons = make(initial=2**32 - 32)
    for _ in range(3):
        prod.send_nowait(b"12345678")  # 16-byte records
    assert cons.receive_nowait() is not None  # consumer now knows prod = start + 48
    poke(buf, PROD, 2**32 - 32 + 24)  # behind what the consumer already saw
    assert cons.receive_nowait() is not None  # cached, already validated index
    with pytest.raises(RingCorruptError, match="moved backwards"):
        cons.receive_nowait()
        cons.receive_nowait()


def test_misaligned_producer_index() -> None:
    buf, _, cons = make()
    poke(buf, PROD, 12)
    with pytest.raises(RingCorruptError, match="not a multiple of 8"):
        cons.receive_nowait()


def test_record_length_over_the_limit() -> None:
    buf, prod, cons = make()
    prod.send_nowait(b"x" * 16)
    poke(buf, DATA, 5000)
    with pytest.raises(RingCorruptError, match="5000-byte record; the negotiated limit is 1024"):
        cons.receive_nowait()


def test_record_length_past_the_published_end() -> None:
    buf, prod, cons = make()
    prod.send_nowait(b"x" * 16)  # one 24-byte record published
    poke(buf, DATA, 100)  # claims 100 bytes: fits the limit, not the published data
    with pytest.raises(RingCorruptError, match="runs past the published data"):
        cons.receive_nowait()


def test_prepare_wait_validates_too() -> None:
    buf, _, cons = make()
    poke(buf, PROD, 2**31)
    with pytest.raises(RingCorruptError):
        cons.prepare_wait()


def test_consumer_index_past_our_producer() -> None:
    buf, prod, _ = make()
    for _ in range(4):
        prod.send_nowait(b"x" * 1000)  # 4 x 1008 bytes published: the ring is full
    poke(buf, CONS, 4096)  # beyond the 4032 bytes we ever published
    with pytest.raises(RingCorruptError, match="consumer index"):
        prod.send_nowait(b"y" * 1000)


def test_consumer_index_moving_backwards() -> None:
    buf, prod, cons = make()
    big = b"x" * 1000
    for _ in range(3):
        prod.send_nowait(big)
    cons.receive_nowait()
    assert prod.free_space() == SIZE - 2 * 1008  # producer has now seen cons = 1008
    poke(buf, CONS, 0)
    with pytest.raises(RingCorruptError, match="moved backwards or past"):
        prod.free_space()


def test_attach_refuses_a_non_empty_ring() -> None:
    buf = bytearray(SPEC.end)
    initialise_ring(buf, SPEC)
    poke(buf, PROD, 64)
    with pytest.raises(RingCorruptError, match="not empty"):
        RingConsumer(buf, SPEC)


def test_garbage_event_indices_only_change_doorbells() -> None:
    buf, prod, cons = make()
    poke(buf, PROD_EVENT, 0xDEADBEEF)
    poke(buf, CONS_EVENT, 0x12345678)
    prod.send_nowait(b"still fine")
    assert cons.receive_nowait() == (b"still fine", False)


def test_frame_modified_after_the_doorbell_does_not_change_the_copy() -> None:
    """The consumer returns a private copy: later writes to shared memory are invisible."""
    buf, prod, cons = make()
    assert prod.send_nowait(b"original payload") is True  # doorbell rung
    item = cons.receive_nowait()
    assert item is not None
    frame, _ = item
    assert type(frame) is bytes
    buf[DATA + 4 : DATA + 20] = b"EVIL EVIL EVIL!!"
    poke(buf, DATA, 999)
    assert frame == b"original payload"


def test_frame_modified_before_the_read_is_validated_as_read() -> None:
    """A peer rewriting a record after ringing: the consumer validates what it copies."""
    buf, prod, cons = make()
    prod.send_nowait(b"A" * 40)  # 48-byte record
    # The peer shortens the length and changes bytes: the consumer takes the new,
    # consistent value once (8 bytes) and the rest of the record is skipped.
    poke(buf, DATA, 8)
    buf[DATA + 4 : DATA + 12] = b"B" * 8
    assert cons.receive_nowait() == (b"B" * 8, False)
    # The skipped bytes are now parsed as the next record: a garbage length there
    # (0x41414141) is over the limit and breaks the ring instead of being trusted.
    with pytest.raises(RingCorruptError):
        cons.receive_nowait()
