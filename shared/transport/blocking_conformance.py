"""A conformance suite for the blocking frame transports (what ``pcifront.blocking`` uses).

The blocking twins of the trio transports (:func:`open_blocking_transport`)
promise the same contract, from the calling thread. Each check pairs a
:class:`BlockingTransport` with a trio :class:`FrameTransport` of the same
scheme (the end a backend has), so it checks both the blocking end's contract
and that the two ends interoperate::

    from shared.transport.blocking_conformance import BlockingTransportConformance

    class TestMyBlockingTransport(BlockingTransportConformance):
        def make_pair(self, max_frame_size):
            return my_pair(max_frame_size)   # async context manager of (blocking, peer)

The blocking end is driven from worker threads (``trio.to_thread``); every
blocking receive has a deadline, so a broken transport fails a check instead
of hanging it. As in :mod:`shared.transport.conformance`, the checks are plain
``async`` methods named ``test_*`` and this module does not import pytest.

What is checked: ordering both ways, frames up to the limit and one over it,
a flood larger than every buffer (the sender waits, nothing is lost), a
receive whose deadline passes (None, and nothing lost), and close and
peer-death semantics from both ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio

from shared.transport._base import FrameTooLargeError, FrameTransport
from shared.transport._blocking import BlockingTransport
from shared.transport.conformance import ConformanceFailure, _check, _frame

__all__ = ["BlockingTransportConformance", "BlockingPairFactory"]

BlockingPairFactory = Callable[
    [int], AbstractAsyncContextManager[tuple[BlockingTransport, FrameTransport]]
]
#: Seconds any one blocking receive of a check may take before the check fails.
PATIENCE = 30.0


def _send_all(end: BlockingTransport, frames: list[bytes]) -> None:
    for frame in frames:
        end.send_frame(frame)


def _receive(end: BlockingTransport, count: int) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(count):
        frame = end.receive_frame(time.monotonic() + PATIENCE)
        _check(frame is not None, f"frame {len(got)} never arrived at the blocking end")
        assert frame is not None
        got.append(frame)
    return got


def _raises(
    exc_types: tuple[type[BaseException], ...], fn: Callable[[], object], what: str
) -> BaseException:
    try:
        fn()
    except exc_types as exc:
        return exc
    raise ConformanceFailure(f"{what}: expected {' or '.join(t.__name__ for t in exc_types)}")


class BlockingTransportConformance:
    """Mix-in test class; subclasses provide :meth:`make_pair`."""

    #: The frame limit used by most checks.
    max_frame_size: int = 64 * 1024
    #: Frames of the limit's size the flood check sends (more than any buffer holds).
    flood_frames: int = 512

    def make_pair(
        self, max_frame_size: int
    ) -> AbstractAsyncContextManager[tuple[BlockingTransport, FrameTransport]]:
        raise NotImplementedError("subclasses return an async context manager of (blocking, peer)")

    async def test_ordering_both_directions(self) -> None:
        sizes = [0, 1, 3, 4, 7, 100, 1000, 4096, 12345]
        frames = [_frame(i, size) for i, size in enumerate(sizes * 5)]
        async with self.make_pair(self.max_frame_size) as (end, peer):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, _send_all, end, frames)
                for i, frame in enumerate(frames):
                    got = await peer.receive_frame()
                    _check(got == frame, f"frame {i} from the blocking end changed or reordered")

            async def feed() -> None:
                for frame in frames:
                    await peer.send_frame(frame)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                got_back = await trio.to_thread.run_sync(_receive, end, len(frames))
            _check(got_back == frames, "frames to the blocking end changed or reordered")

    async def test_frame_at_limit_and_over(self) -> None:
        limit = self.max_frame_size
        async with self.make_pair(limit) as (end, peer):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, end.send_frame, _frame(1, limit))
                got = await peer.receive_frame()
            _check(got == _frame(1, limit), "a frame of exactly the limit must arrive intact")
            _raises(
                (FrameTooLargeError,),
                lambda: end.send_frame(b"x" * (limit + 1)),
                "a frame one byte over the limit",
            )
            # Still usable after refusing it, both ways.
            await trio.to_thread.run_sync(end.send_frame, b"after")
            _check(await peer.receive_frame() == b"after", "transport unusable after oversize")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.send_frame, _frame(2, limit))
                (back,) = await trio.to_thread.run_sync(_receive, end, 1)
            _check(back == _frame(2, limit), "a frame of the limit to the blocking end changed")

    async def test_a_flood_waits_for_the_reader_and_loses_nothing(self) -> None:
        limit = self.max_frame_size
        frames = [_frame(i, limit) for i in range(self.flood_frames)]
        async with self.make_pair(limit) as (end, peer):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, _send_all, end, frames)
                for i in range(len(frames)):
                    got = await peer.receive_frame()
                    _check(got == frames[i], f"frame {i} of a flood was lost, torn or reordered")

    async def test_a_receive_whose_deadline_passes_loses_nothing(self) -> None:
        async with self.make_pair(self.max_frame_size) as (end, peer):
            missed = await trio.to_thread.run_sync(end.receive_frame, time.monotonic())
            _check(missed is None, "a receive past its deadline must return None")
            await peer.send_frame(b"first")
            (got,) = await trio.to_thread.run_sync(_receive, end, 1)
            _check(got == b"first", "a frame sent after a timed-out receive was lost or torn")

    async def test_peer_close_is_end_of_channel_after_its_last_frames(self) -> None:
        async with self.make_pair(self.max_frame_size) as (end, peer):
            await peer.send_frame(b"last words")
            await peer.aclose()
            (got,) = await trio.to_thread.run_sync(_receive, end, 1)
            _check(got == b"last words", "a frame sent before the peer closed was lost")
            _raises(
                (trio.EndOfChannel,),
                lambda: end.receive_frame(time.monotonic() + PATIENCE),
                "receive after the peer closed",
            )

    async def test_own_close_is_idempotent_and_seen_by_the_peer(self) -> None:
        async with self.make_pair(self.max_frame_size) as (end, peer):
            await trio.to_thread.run_sync(end.send_frame, b"bye")
            end.close()
            end.close()  # idempotent
            _check(await peer.receive_frame() == b"bye", "the frame before close was lost")
            with trio.fail_after(PATIENCE):
                try:
                    extra = await peer.receive_frame()
                except (trio.EndOfChannel, trio.BrokenResourceError):
                    extra = None
            _check(extra is None, "the peer received a frame nobody sent")
            _raises((trio.ClosedResourceError,), lambda: end.send_frame(b"x"), "send after close")
            _raises(
                (trio.ClosedResourceError,),
                lambda: end.receive_frame(time.monotonic()),
                "receive after close",
            )

    async def test_send_to_a_closed_peer_breaks(self) -> None:
        async with self.make_pair(self.max_frame_size) as (end, peer):
            await peer.aclose()
            payload = b"z" * 4096

            def keep_sending() -> None:
                # Sends may be buffered for a while; a closed peer must surface as an
                # error, never as an endless successful send or a hang.
                deadline = time.monotonic() + PATIENCE
                while time.monotonic() < deadline:
                    end.send_frame(payload)

            await trio.to_thread.run_sync(
                lambda: _raises(
                    (trio.BrokenResourceError, trio.ClosedResourceError),
                    keep_sending,
                    "sending to a peer that closed",
                )
            )
