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
``async`` methods named ``test_*``, so pytest (with pytest-trio in trio mode)
collects them; :func:`run_blocking_conformance` runs them without pytest.
This module does not import pytest.

What is checked: ordering both ways, frames up to the limit and one over it,
many frames in flight, a flood larger than every buffer (the sender waits,
nothing is lost), ``receive_frame_nowait`` keeping order, a receive whose
deadline passes (None, and nothing lost), close and peer-death semantics from
both ends, two threads receiving at once (:class:`trio.BusyResourceError`),
the peer's identity, and file descriptors where the blocking end can pass
them (a clean :class:`FdPassingUnsupportedError` where it cannot).
Cancellation does not apply: a blocking call cannot be cancelled midway.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio

from shared.transport._base import FdPassingUnsupportedError, FrameTooLargeError, FrameTransport
from shared.transport._blocking import BlockingTransport
from shared.transport._identity import PeerIdentity
from shared.transport.conformance import ConformanceFailure, _check, _frame

__all__ = ["BlockingTransportConformance", "BlockingPairFactory", "run_blocking_conformance"]

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

    def check_peer_identity(self, identity: PeerIdentity) -> None:
        """Override to check what this transport knows of its peer (the default: little)."""
        _check(bool(identity.describe()), "peer_identity() describes nothing")

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
                nursery.start_soon(trio.to_thread.run_sync, _send_all, end, [_frame(1, limit)])
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

    async def test_many_in_flight(self) -> None:
        frames = [_frame(i, 16 + i % 200) for i in range(500)]
        async with self.make_pair(self.max_frame_size) as (end, peer):
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, _send_all, end, frames)
                for _ in frames:
                    got.append(await peer.receive_frame())
            _check(got == frames, "pipelined frames were lost, duplicated or reordered")

    async def test_a_flood_waits_for_the_reader_and_loses_nothing(self) -> None:
        limit = self.max_frame_size
        frames = [_frame(i, limit) for i in range(self.flood_frames)]
        async with self.make_pair(limit) as (end, peer):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, _send_all, end, frames)
                for i in range(len(frames)):
                    got = await peer.receive_frame()
                    _check(got == frames[i], f"frame {i} of a flood was lost, torn or reordered")

    async def test_receive_nowait_keeps_order(self) -> None:
        frames = [_frame(i, 10 + 37 * i) for i in range(40)]
        async with self.make_pair(self.max_frame_size) as (end, peer):
            await peer.send_frames(frames)

            def take_all() -> list[bytes]:
                got: list[bytes] = []
                while len(got) < len(frames):
                    frame = end.receive_frame_nowait()
                    got.extend([frame] if frame is not None else _receive(end, 1))
                return got

            got = await trio.to_thread.run_sync(take_all)
            _check(got == frames, "receive_frame/receive_frame_nowait lost or reordered frames")
            _check(end.receive_frame_nowait() is None, "receive_frame_nowait invented a frame")

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
                await _expect_end(peer)
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

    async def test_two_receivers_at_once_is_busy(self) -> None:
        async with self.make_pair(self.max_frame_size) as (end, peer):
            got: list[bytes] = []

            async def first_receiver() -> None:
                got.extend(await trio.to_thread.run_sync(_receive, end, 1))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_receiver)
                # Until the worker thread is inside receive_frame. A thread has no
                # wait_all_tasks_blocked: this polls the transport's own answer.
                with trio.fail_after(PATIENCE):
                    while not end.receiving:
                        await trio.sleep(0.001)
                try:
                    # From this (another) thread; bounded, so a transport that lets a
                    # second receiver in fails here instead of blocking the loop long.
                    _raises(
                        (trio.BusyResourceError,),
                        lambda: end.receive_frame(time.monotonic() + 1.0),
                        "a second thread receiving while another one is",
                    )
                    _check(
                        end.receive_frame_nowait() is None,
                        "receive_frame_nowait took a frame while another thread received",
                    )
                finally:
                    await peer.send_frame(b"for the first")  # the first receiver's, always
            _check(got == [b"for the first"], "the first receiver did not get its frame")
            _check(not end.receiving, "receiving stayed true after the receive returned")

    async def test_peer_identity(self) -> None:
        async with self.make_pair(self.max_frame_size) as (end, _peer):
            identity = end.peer_identity()
            _check(isinstance(identity, PeerIdentity), "peer_identity() is not a PeerIdentity")
            self.check_peer_identity(identity)

    async def test_file_descriptors(self) -> None:
        async with self.make_pair(self.max_frame_size) as (end, peer):
            read_end, write_end = os.pipe()
            try:
                if not end.can_pass_fds:
                    _raises(
                        (FdPassingUnsupportedError,),
                        lambda: end.send_frame(b"with fds", [write_end]),
                        "fds on a transport whose can_pass_fds is False",
                    )
                    await trio.to_thread.run_sync(end.send_frame, b"without")
                    _check(await peer.receive_frame() == b"without", "unusable after refusing fds")
                    return
                await trio.to_thread.run_sync(end.send_frame, b"with fds", [write_end])
                frame = await peer.receive_frame()
                fds = peer.take_received_fds()
                try:
                    _check(frame == b"with fds", "the frame that carried fds arrived changed")
                    _check(len(fds) == 1, f"1 fd sent, {len(fds)} received")
                    os.write(fds[0], b"ping")  # the peer's copy is the same pipe
                    _check(os.read(read_end, 4) == b"ping", "the fd received is another file")
                finally:
                    for fd in fds:
                        os.close(fd)
                await trio.to_thread.run_sync(end.send_frame, b"next")
                _check(await peer.receive_frame() == b"next", "the frame after the fds changed")
                _check(peer.take_received_fds() == [], "fds leaked onto the next frame")
            finally:
                os.close(read_end)
                os.close(write_end)


async def _expect_end(peer: FrameTransport) -> None:
    try:
        await peer.receive_frame()
    except (trio.EndOfChannel, trio.BrokenResourceError):
        return
    raise ConformanceFailure("the peer received a frame nobody sent")


CHECKS = [name for name in dir(BlockingTransportConformance) if name.startswith("test_")]


async def run_blocking_conformance(
    make_pair: BlockingPairFactory, *, max_frame_size: int = 64 * 1024
) -> list[str]:
    """Run every check without pytest; returns the names that passed, raises on failure."""

    class _Suite(BlockingTransportConformance):
        pass

    suite = _Suite()
    suite.max_frame_size = max_frame_size
    suite.make_pair = make_pair  # type: ignore[method-assign,assignment]
    passed = []
    for name in CHECKS:
        await getattr(suite, name)()
        passed.append(name)
    return passed
