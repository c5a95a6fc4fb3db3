"""Fuzz target: the shared-memory ring consumer and producer against a hostile peer.

The input *is* the shared memory: the control block and data area of one ring
(as a guest could write them at any moment), plus a script of operations. The
consumer must return records within ``max_record`` or raise ``RingCorruptError``
(and stay broken); the producer must refuse a hostile ``cons`` the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import instrumented

with instrumented(__name__, ["shared.ring"]):
    from shared.ring import (
        RING_CTRL_SIZE,
        RingConsumer,
        RingCorruptError,
        RingFullError,
        RingProducer,
        RingSpec,
    )

SIZE = 4096
MAX_RECORD = 1024
SPEC = RingSpec.standalone(SIZE, MAX_RECORD)


def _consume(buf: bytearray, script: bytes) -> None:
    consumer = RingConsumer(buf, SPEC)
    try:
        for op in script[:64]:
            if op & 1:
                consumer.prepare_wait()
            got = consumer.receive_nowait()
            if got is not None and len(got[0]) > MAX_RECORD:
                raise AssertionError(f"consumer returned a {len(got[0])}-byte record")
            # The peer moves its index between our operations.
            buf[op % 8] ^= op
    except RingCorruptError:
        try:
            consumer.receive_nowait()
        except RingCorruptError:
            return
        raise AssertionError("a corrupt ring did not stay broken") from None
    finally:
        consumer.release()


def _produce(buf: bytearray, script: bytes) -> None:
    producer = RingProducer(buf, SPEC)
    try:
        for op in script[:64]:
            try:
                producer.send_nowait(bytes(op % 200))
            except RingFullError:
                producer.prepare_wait_space(op % 200)
            buf[64 + op % 8] ^= op  # the consumer's half of the control block
    except RingCorruptError:
        return
    finally:
        producer.release()


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    region = data[1 : 1 + RING_CTRL_SIZE + 256]
    script = data[1 + RING_CTRL_SIZE + 256 :]
    buf = bytearray(SPEC.end)
    buf[: len(region)] = region
    # Spread the rest of the region over the data area, so records wrap too.
    for i, b in enumerate(region):
        buf[RING_CTRL_SIZE + (i * 17) % SIZE] = b
    try:
        if data[0] & 1:
            _consume(buf, script)
        else:
            _produce(buf, script)
    except RingCorruptError:
        return  # attaching to a non-empty (hostile) ring is refused, typed


if __name__ == "__main__":
    from _common import run

    run(test_one_input)
