"""A reusable conformance suite for frame transports.

Every built-in transport passes it, and a third-party transport runs it against
itself with one import::

    from shared.transport.conformance import TransportConformance

    class TestMyTransport(TransportConformance):
        def make_pair(self, max_frame_size):
            return my_connected_pair(max_frame_size)   # async context manager

``make_pair`` returns an async context manager yielding ``(client, server)``,
two connected :class:`FrameTransport` ends whose limit is ``max_frame_size``.
The checks are plain ``async`` methods named ``test_*``, so pytest (with
pytest-trio in trio mode) collects them; :func:`run_conformance` runs them
without pytest. This module does not import pytest.

What is checked: ordering, frames up to the limit and one over it, many frames
in flight, close and peer-death semantics, cancellation in the middle of a
send or receive, and back-pressure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio
import trio.testing

from shared.transport._base import FrameTooLargeError, FrameTransport

__all__ = ["TransportConformance", "run_conformance", "ConformanceFailure"]

PairFactory = Callable[[int], AbstractAsyncContextManager[tuple[FrameTransport, FrameTransport]]]


class ConformanceFailure(AssertionError):
    """A transport broke the frame-transport contract; the message says which rule."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceFailure(message)


def _frame(i: int, size: int) -> bytes:
    pattern = i.to_bytes(4, "little")
    return (pattern * (size // 4 + 1))[:size]


async def _expect(
    exc_types: tuple[type[BaseException], ...], fn: Callable[[], Awaitable[Any]], what: str
) -> BaseException:
    try:
        await fn()
    except exc_types as exc:
        return exc
    raise ConformanceFailure(f"{what}: expected {' or '.join(t.__name__ for t in exc_types)}")


class TransportConformance:
    """Mix-in test class; subclasses provide :meth:`make_pair`."""

    #: The frame limit used by most checks. Override for transports with small limits.
    max_frame_size: int = 64 * 1024
    #: Frames the back-pressure check offers before it expects the sender to block.
    backpressure_frames: int = 2048

    def make_pair(
        self, max_frame_size: int
    ) -> AbstractAsyncContextManager[tuple[FrameTransport, FrameTransport]]:
        raise NotImplementedError("subclasses return an async context manager of (client, server)")

    async def test_ordering_both_directions(self) -> None:
        async with self.make_pair(self.max_frame_size) as (a, b):
            sizes = [0, 1, 3, 4, 7, 100, 1000, 4096, 12345]
            async with trio.open_nursery() as nursery:

                async def pump(src: FrameTransport) -> None:
                    for i, size in enumerate(sizes * 5):
                        await src.send_frame(_frame(i, size))

                nursery.start_soon(pump, a)
                nursery.start_soon(pump, b)
                for dst in (b, a):
                    for i, size in enumerate(sizes * 5):
                        got = await dst.receive_frame()
                        _check(got == _frame(i, size), f"frame {i} arrived changed or out of order")

    async def test_frame_at_limit_and_over(self) -> None:
        limit = self.max_frame_size
        async with self.make_pair(limit) as (a, b):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_frame, _frame(1, limit))
                got = await b.receive_frame()
            _check(got == _frame(1, limit), "a frame of exactly the limit must arrive intact")
            await _expect(
                (FrameTooLargeError,),
                lambda: a.send_frame(b"x" * (limit + 1)),
                "a frame one byte over the limit",
            )
            # The transport stays usable after refusing an oversized frame.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_frame, b"after")
                _check(await b.receive_frame() == b"after", "transport unusable after oversize")

    async def test_many_in_flight(self) -> None:
        count = 500
        async with self.make_pair(self.max_frame_size) as (a, b):
            received: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    for _ in range(count):
                        received.append(await b.receive_frame())

                nursery.start_soon(reader)
                for i in range(count):
                    await a.send_frame(_frame(i, 16 + i % 200))
            _check(
                received == [_frame(i, 16 + i % 200) for i in range(count)],
                "pipelined frames were lost, duplicated or reordered",
            )

    async def test_batches_and_nowait_receive_keep_order(self) -> None:
        frames = [_frame(i, 10 + 37 * i) for i in range(40)]
        async with self.make_pair(self.max_frame_size) as (a, b):
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_frames, frames)
                while len(got) < len(frames):
                    frame = b.receive_frame_nowait()
                    got.append(frame if frame is not None else await b.receive_frame())
            _check(got == frames, "send_frames/receive_frame_nowait lost or reordered frames")
            _check(b.receive_frame_nowait() is None, "receive_frame_nowait invented a frame")

    async def test_close_semantics(self) -> None:
        async with self.make_pair(self.max_frame_size) as (a, b):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_frame, b"last words")
                _check(await b.receive_frame() == b"last words", "frame before close lost")
            await a.aclose()
            await a.aclose()  # idempotent
            await _expect((trio.EndOfChannel,), b.receive_frame, "receive after the peer closed")
            await _expect((trio.ClosedResourceError,), a.receive_frame, "receive after own close")
            await _expect(
                (trio.ClosedResourceError,), lambda: a.send_frame(b"x"), "send after own close"
            )

    async def test_send_to_dead_peer_breaks(self) -> None:
        async with self.make_pair(self.max_frame_size) as (a, b):
            await b.aclose()
            payload = b"z" * 4096

            async def keep_sending() -> None:
                # Sends may be buffered for a while; a dead peer must surface as an error,
                # never as an endless successful send or a hang.
                for _ in range(100_000):
                    await a.send_frame(payload)

            with trio.fail_after(30):
                await _expect(
                    (trio.BrokenResourceError, trio.ClosedResourceError),
                    keep_sending,
                    "sending to a peer that closed",
                )

    async def test_receive_cancellation_loses_nothing(self) -> None:
        async with self.make_pair(self.max_frame_size) as (a, b):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(b.receive_frame)
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_frame, b"first")
                _check(
                    await b.receive_frame() == b"first",
                    "a frame sent after a cancelled receive was lost or torn",
                )

    async def test_send_cancellation_never_tears_a_frame(self) -> None:
        limit = self.max_frame_size
        async with self.make_pair(limit) as (a, b):
            sent: list[bytes] = []
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def flood() -> None:
                        for i in range(self.backpressure_frames):
                            frame = _frame(i, limit)
                            await a.send_frame(frame)
                            sent.append(frame)

                    nursery.start_soon(flood)
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            await a.aclose()
            # The receiver sees only whole frames, in order: every frame that
            # send_frame reported as sent, then possibly the cancelled one whole,
            # then either more whole frames or a clean error, never a torn frame.
            received = 0
            while True:
                try:
                    with trio.fail_after(30):
                        got = await b.receive_frame()
                except (trio.EndOfChannel, trio.BrokenResourceError):
                    break
                _check(got == _frame(received, limit), f"frame {received} torn or reordered")
                received += 1
            _check(received >= len(sent), "frames reported sent before the cancel were lost")

    async def test_backpressure(self) -> None:
        limit = self.max_frame_size
        async with self.make_pair(limit) as (a, b):
            sent = 0
            async with trio.open_nursery() as nursery:

                async def flood() -> None:
                    nonlocal sent
                    for i in range(self.backpressure_frames):
                        await a.send_frame(_frame(i, limit))
                        sent += 1

                nursery.start_soon(flood)
                await trio.testing.wait_all_tasks_blocked()
                _check(
                    sent < self.backpressure_frames,
                    "the sender never blocked although nobody read: unbounded buffering",
                )
                for i in range(self.backpressure_frames):
                    got = await b.receive_frame()
                    _check(got == _frame(i, limit), f"frame {i} changed under back-pressure")
            _check(sent == self.backpressure_frames, "sender did not resume after reads")

    async def test_concurrent_use_is_busy(self) -> None:
        async with self.make_pair(self.max_frame_size) as (_a, b):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b.receive_frame)
                await trio.testing.wait_all_tasks_blocked()
                await _expect(
                    (trio.BusyResourceError,), b.receive_frame, "two tasks receiving at once"
                )
                nursery.cancel_scope.cancel()


CHECKS = [name for name in dir(TransportConformance) if name.startswith("test_")]


async def run_conformance(make_pair: PairFactory, *, max_frame_size: int = 64 * 1024) -> list[str]:
    """Run every check without pytest; returns the names that passed, raises on failure."""

    class _Suite(TransportConformance):
        pass

    suite = _Suite()
    suite.max_frame_size = max_frame_size
    suite.make_pair = make_pair  # type: ignore[method-assign,assignment]
    passed = []
    for name in CHECKS:
        await getattr(suite, name)()
        passed.append(name)
    return passed
