"""The floors every figure is divided by, measured in the same run, with no protocol at all.

Three ping-pongs between two processes:

- ``trio``: an eventfd each way, both sides waiting with ``trio.lowlevel.wait_readable``
  (the wake-up cost of any trio program, the issue's "trio eventfd floor");
- ``blocking``: the same eventfds, both sides blocking in ``read(2)``;
- ``ring``: a 29-byte msgpack message each way over the shared ring (``ring.h``),
  both sides busy-polling the ring index in C: no system call at all.

Run as a child process: ``python -m benchmarks._floor KIND RX TX COUNT [MEMFD]``.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

import msgpack
import trio

from shared.ring import CLIENT_TO_SERVER, SERVER_TO_CLIENT, RingConsumer, RingProducer, ShmLayout

__all__ = ["eventfd_floor", "blocking_eventfd_floor", "ring_floor"]

#: The message the ring floor carries (the same size as a config-read request).
PAYLOAD = msgpack.packb([0x12, 1, 0, 0, 4, "pad-to-29-bytes"])[:29]
_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
_SPIN_NS = 1_000_000_000


# --------------------------------------------------------------------------- trio eventfd


async def _trio_pong(rx: int, tx: int, count: int) -> None:
    for _ in range(count):
        await trio.lowlevel.wait_readable(rx)
        os.eventfd_read(rx)
        os.eventfd_write(tx, 1)


async def _trio_ping(rx: int, tx: int, count: int) -> list[int]:
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        os.eventfd_write(tx, 1)
        await trio.lowlevel.wait_readable(rx)
        os.eventfd_read(rx)
        samples.append(time.perf_counter_ns() - start)
    return samples


# --------------------------------------------------------------------------- blocking eventfd


def _blocking_pong(rx: int, tx: int, count: int) -> None:
    os.set_blocking(rx, True)
    for _ in range(count):
        os.eventfd_read(rx)
        os.eventfd_write(tx, 1)


def _blocking_ping(rx: int, tx: int, count: int) -> list[int]:
    os.set_blocking(rx, True)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        os.eventfd_write(tx, 1)
        os.eventfd_read(rx)
        samples.append(clock() - start)
    return samples


# --------------------------------------------------------------------------- busy-poll ring


def _ring_ends(memfd: int, layout: ShmLayout, *, parent: bool) -> tuple[RingProducer, RingConsumer]:
    mm = mmap.mmap(memfd, layout.total)
    tx, rx = CLIENT_TO_SERVER, SERVER_TO_CLIENT
    if not parent:
        tx, rx = rx, tx
    return RingProducer(mm, layout.ring_spec(tx)), RingConsumer(mm, layout.ring_spec(rx))


def _take(consumer: RingConsumer) -> bytes:
    while True:
        item = consumer.receive_nowait()
        if item is not None:
            return item[0]
        consumer.spin(_SPIN_NS)


def _ring_pong(memfd: int, ready: int, count: int) -> None:
    producer, consumer = _ring_ends(memfd, _LAYOUT, parent=False)
    os.eventfd_write(ready, 1)  # attached: the parent may start
    for _ in range(count):
        producer.send_nowait(msgpack.unpackb(_take(consumer)) and PAYLOAD)


def _ring_ping(memfd: int, ready: int, count: int) -> list[int]:
    producer, consumer = _ring_ends(memfd, _LAYOUT, parent=True)
    os.set_blocking(ready, True)
    os.eventfd_read(ready)  # the child attached its ends
    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        producer.send_nowait(PAYLOAD)
        msgpack.unpackb(_take(consumer))
        samples.append(clock() - start)
    return samples


_LAYOUT = ShmLayout(4096, 4096, 1024)


# --------------------------------------------------------------------------- drivers


def _child(kind: str, args: list[str], pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks._floor", kind, *args], pass_fds=pass_fds
    )


def _eventfd_pair(kind: str, count: int) -> list[int]:
    a, b = os.eventfd(0, _FLAGS), os.eventfd(0, _FLAGS)
    child = _child(kind, [str(a), str(b), str(count)], (a, b))
    try:
        if kind == "trio":
            return trio.run(_trio_ping, b, a, count)
        return _blocking_ping(b, a, count)
    finally:
        child.wait(timeout=120)
        os.close(a)
        os.close(b)


def eventfd_floor(count: int) -> list[int]:
    """Round-trip times (ns) of ``count`` trio eventfd ping-pongs with a child process."""
    return _eventfd_pair("trio", count)


def blocking_eventfd_floor(count: int) -> list[int]:
    """Round-trip times (ns) of ``count`` blocking eventfd ping-pongs with a child process."""
    return _eventfd_pair("blocking", count)


def ring_floor(count: int) -> list[int]:
    """Round-trip times (ns) of ``count`` busy-polled ring ping-pongs with a child process."""
    memfd = os.memfd_create("pcisplit-ring-floor", os.MFD_CLOEXEC)
    ready = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        os.ftruncate(memfd, _LAYOUT.total)
        with mmap.mmap(memfd, _LAYOUT.total) as mm:
            _LAYOUT.initialise(mm)
        child = _child("ring", [str(ready), "0", str(count), str(memfd)], (memfd, ready))
        try:
            return _ring_ping(memfd, ready, count)
        finally:
            child.wait(timeout=120)
    finally:
        os.close(memfd)
        os.close(ready)


if __name__ == "__main__":
    _kind, _rx, _tx, _count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if _kind == "trio":
        trio.run(_trio_pong, _rx, _tx, _count)
    elif _kind == "blocking":
        _blocking_pong(_rx, _tx, _count)
    elif _kind == "ring":
        _ring_pong(int(sys.argv[5]), _rx, _count)
