"""Ring unit tests on a plain buffer: no processes, no event loop."""

from __future__ import annotations

import mmap

import pytest

from shared.ring import (
    RING_CTRL_SIZE,
    SHM_DATA_OFFSET,
    RecordTooLargeError,
    RingConsumer,
    RingError,
    RingFullError,
    RingProducer,
    RingSpec,
    ShmLayout,
    initialise_ring,
    need_notify,
    record_size,
    ring_size_for,
)
from shared.ring._cffi import ffi

SIZE = 4096
NEAR_WRAP = 2**32 - 64  # indices cross 2**32 after 64 bytes


def make_ring(
    size: int = SIZE, initial: int = 0, max_record: int | None = None
) -> tuple[bytearray, RingProducer, RingConsumer]:
    spec = RingSpec.standalone(size, max_record)
    buf = bytearray(spec.end)
    initialise_ring(buf, spec, initial_index=initial)
    return buf, RingProducer(buf, spec), RingConsumer(buf, spec)


def ctrl(buf: bytearray) -> object:
    return ffi.cast("struct pcisplit_ring_ctrl *", ffi.from_buffer(buf))


def test_record_size_pads_to_eight() -> None:
    assert [record_size(n) for n in (0, 1, 4, 5, 12, 13)] == [8, 8, 8, 16, 16, 24]


def test_round_trip_and_empty() -> None:
    _, prod, cons = make_ring()
    assert cons.receive_nowait() is None
    assert prod.send_nowait(b"hello") is True  # first record always notifies
    assert cons.receive_nowait() == (b"hello", False)
    assert cons.receive_nowait() is None


def test_empty_frame_is_a_record() -> None:
    _, prod, cons = make_ring()
    prod.send_nowait(b"")
    prod.send_nowait(b"x")
    assert cons.receive_nowait() == (b"", False)
    assert cons.receive_nowait() == (b"x", False)


def test_wrap_around_splits_the_copy() -> None:
    _, prod, cons = make_ring()
    # Leave the producer 12 bytes before the end, so the next payload straddles it.
    filler = b"f" * (SIZE - 24 - 4)
    prod.send_nowait(filler)
    assert cons.receive_nowait() == (filler, False)
    assert prod.private_prod % SIZE == SIZE - 24
    payload = bytes(range(100))
    prod.send_nowait(payload)
    assert cons.receive_nowait() == (payload, False)


def test_indices_cross_two_to_the_32() -> None:
    _, prod, cons = make_ring(initial=NEAR_WRAP)
    frames = [bytes([i]) * (i * 37 % 300) for i in range(200)]
    for frame in frames:
        prod.send_nowait(frame)
        assert cons.receive_nowait() == (frame, False)
    assert prod.private_prod < NEAR_WRAP  # wrapped past 2**32
    assert cons.private_cons == prod.private_prod


def test_full_ring_refuses_then_accepts_after_consume() -> None:
    _, prod, cons = make_ring()
    frame = b"z" * 1000  # 1008-byte records: four fit in 4096
    for _ in range(4):
        prod.send_nowait(frame)
    with pytest.raises(RingFullError):
        prod.send_nowait(frame)
    assert prod.free_space() == SIZE - 4 * 1008
    assert cons.receive_nowait() == (frame, False)
    prod.send_nowait(frame)
    assert [cons.receive_nowait() for _ in range(4)] == [(frame, False)] * 4


def test_a_full_ring_write_writes_nothing() -> None:
    buf, prod, _cons = make_ring()
    prod.send_nowait(b"a" * (SIZE - 16))
    before = bytes(buf)
    with pytest.raises(RingFullError):
        prod.send_nowait(b"b" * 20)
    assert bytes(buf) == before


def test_max_record_is_enforced_locally() -> None:
    _, prod, _ = make_ring(max_record=100)
    with pytest.raises(RecordTooLargeError):
        prod.send_nowait(b"x" * 101)
    prod.send_nowait(b"x" * 100)


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (5, 8, 0, True),  # event inside (old, new]
        (8, 8, 0, True),  # the boundary itself
        (9, 16, 8, True),
        (0, 8, 0, False),  # event == old is already past
        (17, 16, 8, False),  # event beyond new
        (2**32 - 4, 4, 2**32 - 8, True),  # window wraps around 2**32
        (2, 4, 2**32 - 8, True),
        (2**32 - 16, 4, 2**32 - 8, False),
        (8, 4, 2**32 - 8, False),
    ],
)
def test_need_notify_u32_arithmetic(event: int, new: int, old: int, expected: bool) -> None:
    assert need_notify(event, new, old) is expected


def test_one_doorbell_per_batch() -> None:
    _, prod, cons = make_ring()
    assert cons.prepare_wait() is False  # consumer goes to sleep, event = cons + 1
    for i in range(5):
        prod.write_nowait(bytes([i]) * 10)
    assert prod.unpublished == 5 * 16
    assert cons.receive_nowait() is None  # nothing visible before publish
    assert prod.publish() is True  # one doorbell for the whole batch
    assert prod.publish() is False  # nothing new
    assert [cons.receive_nowait() for _ in range(5)] == [(bytes([i]) * 10, False) for i in range(5)]


def test_no_doorbell_while_consumer_is_awake() -> None:
    _, prod, cons = make_ring()
    assert prod.send_nowait(b"1") is True
    assert cons.receive_nowait() is not None
    # The consumer never said it sleeps again, so the producer stays quiet.
    assert [prod.send_nowait(b"x") for _ in range(10)] == [False] * 10
    while cons.receive_nowait() is not None:
        pass
    assert cons.prepare_wait() is False
    assert prod.send_nowait(b"2") is True


@pytest.mark.parametrize("initial", [0, NEAR_WRAP])
def test_lost_wakeup_publish_between_check_and_sleep(initial: int) -> None:
    """Producer publishes after the consumer saw 'empty' but before it set its event.

    The producer sees a stale event index and does not notify; the consumer's
    final check after the fence must then find the record, or it would sleep
    forever with work pending.
    """
    _, prod, cons = make_ring(initial=initial)
    prod.send_nowait(b"warm-up")
    assert cons.receive_nowait() is not None
    assert cons.receive_nowait() is None  # 1. consumer: empty
    notified = prod.send_nowait(b"racing")  # 2. producer publishes meanwhile
    assert notified is False  # stale event index: no doorbell
    assert cons.prepare_wait() is True  # 3. final check catches it: do not sleep
    assert cons.receive_nowait() == (b"racing", False)


@pytest.mark.parametrize("initial", [0, NEAR_WRAP])
def test_lost_wakeup_publish_after_final_check(initial: int) -> None:
    _, prod, cons = make_ring(initial=initial)
    prod.send_nowait(b"warm-up")
    assert cons.receive_nowait() is not None
    assert cons.prepare_wait() is False  # consumer sleeps
    assert prod.send_nowait(b"late") is True  # so the producer must ring
    assert prod.send_nowait(b"later") is False  # once
    assert cons.receive_nowait() == (b"late", False)


def test_producer_waiting_for_space_gets_exactly_one_doorbell() -> None:
    _, prod, cons = make_ring()
    big = b"b" * 2000  # 2008-byte records: two fit
    prod.send_nowait(big)
    prod.send_nowait(big)
    with pytest.raises(RingFullError):
        prod.send_nowait(big)
    assert prod.prepare_wait_space(len(big)) is False  # sleeps, asks for a doorbell
    assert cons.receive_nowait() == (big, True)  # freeing enough space rings it
    assert cons.receive_nowait() == (big, False)
    assert prod.send_nowait(big) is False


def test_space_freed_between_full_and_prepare_is_seen() -> None:
    _, prod, cons = make_ring()
    big = b"b" * 2000
    prod.send_nowait(big)
    prod.send_nowait(big)
    with pytest.raises(RingFullError):
        prod.send_nowait(big)
    assert cons.receive_nowait() == (big, False)  # consumer frees before the event is set
    assert prod.prepare_wait_space(len(big)) is True


def test_release_makes_later_calls_safe() -> None:
    _, prod, cons = make_ring()
    prod.release()
    cons.release()
    with pytest.raises(RingError, match="released"):
        prod.send_nowait(b"x")
    with pytest.raises(RingError, match="released"):
        cons.receive_nowait()


def test_spec_validation() -> None:
    with pytest.raises(RingError, match="power of two"):
        RingSpec(size=5000, max_record=10)
    with pytest.raises(RingError, match="does not fit"):
        RingSpec(size=4096, max_record=4096)
    with pytest.raises(RingError, match="overlaps"):
        RingSpec(size=4096, max_record=10, ctrl_offset=0, data_offset=64)
    with pytest.raises(RingError, match="too small"):
        RingProducer(bytearray(100), RingSpec.standalone(4096))


def test_layout_on_mmap_and_size_choice() -> None:
    assert ring_size_for(5000, 100) == 8192
    assert ring_size_for(4096, 64 * 1024) == 128 * 1024  # one max frame must fit
    layout = ShmLayout(8192, 4096, 1000)
    assert layout.total == SHM_DATA_OFFSET + 8192 + 4096
    c2s, s2c = layout.ring_spec(0), layout.ring_spec(1)
    assert s2c.ctrl_offset - c2s.ctrl_offset == RING_CTRL_SIZE
    assert s2c.data_offset == c2s.data_offset + 8192
    mm = mmap.mmap(-1, layout.total)
    layout.initialise(mm)
    header = ffi.cast("struct pcisplit_shm_header *", ffi.from_buffer(mm))
    assert (header.magic, header.ring_size[0], header.ring_size[1]) == (0x4D485350, 8192, 4096)
    del header
    prod, cons = RingProducer(mm, s2c), RingConsumer(mm, s2c)
    prod.send_nowait(b"over mmap")
    assert cons.receive_nowait() == (b"over mmap", False)
    prod.release()
    cons.release()
    mm.close()  # no BufferError: the ring ends released their views
