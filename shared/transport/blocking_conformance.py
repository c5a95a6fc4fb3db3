"""A reusable conformance suite for blocking frame transports.

The blocking twins of the trio transports (``shared.transport._blocking``,
driven by ``pcifront.blocking``) pass the same kind of checks as the trio
ones (:mod:`shared.transport.conformance`), adapted to calls that block the
calling thread instead of awaiting::

    from shared.transport.blocking_conformance import BlockingTransportConformance

    class TestMyBlockingTransport(BlockingTransportConformance):
        def make_pair(self, max_frame_size):
            return my_connected_pair(max_frame_size)   # a context manager

``make_pair`` returns a context manager yielding ``(client, peer)``:
``client`` is the :class:`BlockingTransport` under test, connected (its
session started, where it has one) with the frame limit ``max_frame_size``;
``peer`` is the other end, anything with the blocking methods of
:class:`FramePeer`. A blocking transport talks to a server, which is usually
a trio listener: :func:`trio_peer_pair` gives such a pair for any address a
trio listener and :func:`~shared.transport.open_blocking_transport` both
understand, running the listener's end in a trio event loop on its own
thread (:class:`TrioPeer`).

The checks are plain methods named ``test_*``, so pytest collects them;
:func:`run_blocking_conformance` runs them without pytest. This module does
not import pytest.

What is checked: frames both ways in order, frames up to the limit and one
over it, many frames in flight, ``receive_frame_nowait``, a receive's
deadline (it returns None and loses nothing), close and end-of-stream
semantics both ways, a peer that went away, two threads receiving at once
(:class:`trio.BusyResourceError`), the peer's identity, and file descriptors
where the transport can pass them (and a clean refusal where it cannot).
Cancellation does not apply: nothing here can be cancelled mid-call.
Every wait is bounded (:attr:`BlockingTransportConformance.timeout`), so a
transport that hangs fails the check instead of hanging the suite.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, TypeVar

import trio

from shared.transport._base import (
    FdPassingUnsupportedError,
    FrameTooLargeError,
    FrameTransport,
    TransportOptions,
)
from shared.transport._blocking import BlockingTransport, open_blocking_transport
from shared.transport._identity import PeerIdentity
from shared.transport._registry import open_listener

__all__ = [
    "BlockingTransportConformance",
    "FramePeer",
    "TrioPeer",
    "trio_peer_pair",
    "run_blocking_conformance",
    "BlockingConformanceFailure",
]

T = TypeVar("T")


class BlockingConformanceFailure(AssertionError):
    """A blocking transport broke the frame-transport contract; the message says which rule."""


class FramePeer(Protocol):
    """The other end of a blocking transport under test, driven from the test's threads."""

    def send_frame(self, frame: bytes) -> None:
        """Send one frame to the client."""

    def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send several frames to the client at once (one batch where the transport can)."""

    def receive_frame(self) -> bytes:
        """The next frame from the client; :class:`trio.EndOfChannel` once it closed."""

    def receive_frame_with_fds(self) -> tuple[bytes, list[int]]:
        """The next frame and the fds that came with it (the caller owns them)."""

    def close(self) -> None:
        """Close this end: the client then sees the end of the stream."""


PairFactory = Callable[[int], AbstractContextManager[tuple[BlockingTransport, FramePeer]]]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BlockingConformanceFailure(message)


def _frame(i: int, size: int) -> bytes:
    pattern = i.to_bytes(4, "little")
    return (pattern * (size // 4 + 1))[:size]


def _expect(
    exc_types: tuple[type[BaseException], ...], fn: Callable[[], Any], what: str
) -> BaseException:
    try:
        fn()
    except exc_types as exc:
        return exc
    raise BlockingConformanceFailure(
        f"{what}: expected {' or '.join(t.__name__ for t in exc_types)}"
    )


class _Job:
    """A call run on its own thread; :meth:`result` joins it (bounded) and re-raises."""

    def __init__(self, fn: Callable[[], Any], what: str) -> None:
        self._what = what
        self._outcome: list[Any] = []
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(fn,), name=what, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread by result()
            self._error.append(exc)

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise BlockingConformanceFailure(f"{self._what} did not finish within {timeout} s")
        if self._error:
            raise self._error[0]
        return self._outcome[0]


class BlockingTransportConformance:
    """Mix-in test class; subclasses provide :meth:`make_pair`."""

    #: The frame limit used by most checks. Override for transports with small limits.
    max_frame_size: int = 64 * 1024
    #: The longest any one step may take before the check fails (seconds).
    timeout: float = 30.0

    def make_pair(
        self, max_frame_size: int
    ) -> AbstractContextManager[tuple[BlockingTransport, FramePeer]]:
        raise NotImplementedError("subclasses return a context manager of (client, peer)")

    def check_peer_identity(self, identity: PeerIdentity) -> None:
        """Override to check what this transport knows about its peer (the default: little)."""
        _check(bool(identity.describe()), "peer_identity() describes nothing")

    # ------------------------------------------------------------------ helpers
    def _receive(self, client: BlockingTransport) -> bytes:
        frame = client.receive_frame(time.monotonic() + self.timeout)
        _check(frame is not None, f"no frame arrived within {self.timeout} s")
        assert frame is not None
        return frame

    def _job(self, fn: Callable[[], Any], what: str) -> _Job:
        return _Job(fn, what)

    # ------------------------------------------------------------------ the checks
    def test_frames_both_ways_in_order(self) -> None:
        sizes = [0, 1, 3, 4, 7, 100, 1000, 4096, 12345] * 5
        frames = [_frame(i, size) for i, size in enumerate(sizes)]
        with self.make_pair(self.max_frame_size) as (client, peer):

            def client_sends() -> None:
                for frame in frames:
                    client.send_frame(frame)

            def peer_sends() -> None:
                for frame in frames:
                    peer.send_frame(frame)

            sending = self._job(client_sends, "the client sending")
            answering = self._job(peer_sends, "the peer sending")
            for i, frame in enumerate(frames):
                _check(peer.receive_frame() == frame, f"frame {i} reached the peer changed")
            for i, frame in enumerate(frames):
                _check(self._receive(client) == frame, f"frame {i} reached the client changed")
            sending.result(self.timeout)
            answering.result(self.timeout)

    def test_frame_at_limit_and_over(self) -> None:
        limit = self.max_frame_size
        with self.make_pair(limit) as (client, peer):
            sending = self._job(lambda: client.send_frame(_frame(1, limit)), "a send at the limit")
            _check(peer.receive_frame() == _frame(1, limit), "a frame of the limit arrived changed")
            sending.result(self.timeout)
            peer.send_frame(_frame(2, limit))
            _check(self._receive(client) == _frame(2, limit), "a received frame of the limit")
            _expect(
                (FrameTooLargeError,),
                lambda: client.send_frame(b"x" * (limit + 1)),
                "a frame one byte over the limit",
            )
            # The transport stays usable after refusing an oversized frame.
            client.send_frame(b"after")
            _check(peer.receive_frame() == b"after", "transport unusable after an oversize")

    def test_many_in_flight(self) -> None:
        count = 500
        frames = [_frame(i, 16 + i % 200) for i in range(count)]
        with self.make_pair(self.max_frame_size) as (client, peer):
            reading = self._job(lambda: [peer.receive_frame() for _ in frames], "the peer reading")
            for frame in frames:
                client.send_frame(frame)
            _check(reading.result(self.timeout) == frames, "pipelined frames lost or reordered")

    def test_flood_keeps_order_and_sender_resumes(self) -> None:
        # Far more than any socket buffer or ring holds: the sender must wait for the
        # reader (never drop, never buffer without bound) and resume as it reads.
        limit = self.max_frame_size
        count = max(64, (8 << 20) // limit)
        with self.make_pair(limit) as (client, peer):

            def send_all() -> None:
                for i in range(count):
                    client.send_frame(_frame(i, limit))

            flood = self._job(send_all, "the flood")
            for i in range(count):
                _check(peer.receive_frame() == _frame(i, limit), f"flooded frame {i} changed")
            flood.result(self.timeout)

    def test_receive_nowait_keeps_order(self) -> None:
        frames = [_frame(i, 10 + 37 * i) for i in range(40)]
        with self.make_pair(self.max_frame_size) as (client, peer):
            peer.send_frames(frames)
            got: list[bytes] = []
            while len(got) < len(frames):
                frame = client.receive_frame_nowait()
                got.append(frame if frame is not None else self._receive(client))
            _check(got == frames, "receive_frame/receive_frame_nowait lost or reordered frames")
            _check(client.receive_frame_nowait() is None, "receive_frame_nowait invented a frame")

    def test_receive_deadline_returns_none_and_loses_nothing(self) -> None:
        with self.make_pair(self.max_frame_size) as (client, peer):
            _check(
                client.receive_frame(time.monotonic() + 0.05) is None,
                "a receive with nothing to receive did not return None at its deadline",
            )
            _check(
                client.receive_frame(time.monotonic() - 1.0) is None,
                "a receive whose deadline had passed did not return None",
            )
            peer.send_frame(b"after the deadline")
            _check(
                self._receive(client) == b"after the deadline",
                "a frame sent after a receive timed out was lost or torn",
            )

    def test_close_semantics(self) -> None:
        with self.make_pair(self.max_frame_size) as (client, peer):
            peer.send_frame(b"last words")
            peer.close()
            _check(self._receive(client) == b"last words", "a frame sent before close was lost")
            _expect(
                (trio.EndOfChannel,),
                lambda: client.receive_frame(time.monotonic() + self.timeout),
                "receive after the peer closed",
            )
            client.close()
            client.close()  # idempotent
            _expect(
                (trio.ClosedResourceError,),
                lambda: client.receive_frame(time.monotonic() + self.timeout),
                "receive after own close",
            )
            _expect(
                (trio.ClosedResourceError,), lambda: client.send_frame(b"x"), "send after own close"
            )

    def test_client_close_ends_the_peers_stream(self) -> None:
        with self.make_pair(self.max_frame_size) as (client, peer):
            client.send_frame(b"goodbye")
            client.close()
            _check(peer.receive_frame() == b"goodbye", "a frame sent before close was lost")
            _expect((trio.EndOfChannel,), peer.receive_frame, "the peer reading after our close")

    def test_send_to_a_closed_peer_breaks(self) -> None:
        with self.make_pair(self.max_frame_size) as (client, peer):
            peer.close()
            payload = b"z" * min(4096, self.max_frame_size)

            def keep_sending() -> None:
                # Sends may be buffered for a while; a peer that went away must surface
                # as an error, never as endless successful sends or a hang.
                for _ in range(100_000):
                    client.send_frame(payload)

            job = self._job(
                lambda: _expect(
                    (trio.BrokenResourceError, trio.ClosedResourceError),
                    keep_sending,
                    "sending to a peer that closed",
                ),
                "sending to a closed peer",
            )
            job.result(self.timeout)

    def test_two_receivers_at_once_is_busy(self) -> None:
        with self.make_pair(self.max_frame_size) as (client, peer):
            first = self._job(lambda: self._receive(client), "the first receiver")
            deadline = time.monotonic() + self.timeout
            while not client.receiving:  # until the first receiver is inside receive_frame
                _check(time.monotonic() < deadline, "receiving never became true")
                time.sleep(0.001)
            _expect(
                (trio.BusyResourceError,),
                lambda: client.receive_frame(time.monotonic() + self.timeout),
                "a second thread receiving while another one is",
            )
            _check(
                client.receive_frame_nowait() is None,
                "receive_frame_nowait took a frame while another thread received",
            )
            peer.send_frame(b"for the first")
            _check(first.result(self.timeout) == b"for the first", "the first receiver's frame")
            _check(not client.receiving, "receiving stayed true after the receive returned")

    def test_peer_identity(self) -> None:
        with self.make_pair(self.max_frame_size) as (client, _peer):
            identity = client.peer_identity()
            _check(isinstance(identity, PeerIdentity), "peer_identity() is not a PeerIdentity")
            self.check_peer_identity(identity)

    def test_file_descriptors(self) -> None:
        with self.make_pair(self.max_frame_size) as (client, peer):
            read_end, write_end = os.pipe()
            try:
                if not client.can_pass_fds:
                    _expect(
                        (FdPassingUnsupportedError,),
                        lambda: client.send_frame(b"with fds", [write_end]),
                        "fds on a transport whose can_pass_fds is False",
                    )
                    client.send_frame(b"without")  # still usable
                    _check(peer.receive_frame() == b"without", "unusable after refusing fds")
                    return
                client.send_frame(b"with fds", [write_end])
                frame, fds = peer.receive_frame_with_fds()
                try:
                    _check(frame == b"with fds", "the frame that carried fds arrived changed")
                    _check(len(fds) == 1, f"1 fd sent, {len(fds)} received")
                    os.write(fds[0], b"ping")  # the peer's copy is the same pipe
                    _check(os.read(read_end, 4) == b"ping", "the fd received is another file")
                finally:
                    for fd in fds:
                        os.close(fd)
                client.send_frame(b"next")
                frame, fds = peer.receive_frame_with_fds()
                _check((frame, fds) == (b"next", []), "fds leaked onto the next frame")
            finally:
                os.close(read_end)
                os.close(write_end)


CHECKS = [name for name in dir(BlockingTransportConformance) if name.startswith("test_")]


def run_blocking_conformance(
    make_pair: PairFactory, *, max_frame_size: int = 64 * 1024
) -> list[str]:
    """Run every check without pytest; returns the names that passed, raises on failure."""

    class _Suite(BlockingTransportConformance):
        pass

    suite = _Suite()
    suite.max_frame_size = max_frame_size
    suite.make_pair = make_pair  # type: ignore[method-assign,assignment]
    passed = []
    for name in CHECKS:
        getattr(suite, name)()
        passed.append(name)
    return passed


# --------------------------------------------------------------------------- a trio peer


class TrioPeer:
    """The accepting end of a trio :class:`FrameListener`, driven from blocking code.

    A trio event loop runs on its own thread; every method here hands one call
    to it and waits for the answer (bounded by ``timeout``). Use it as a
    context manager; :attr:`address` is where a client connects, and
    :meth:`accept` takes the connection (TLS handshake, and the ``shm:``
    session when ``session`` is set, included).
    """

    def __init__(
        self,
        address: str,
        options: TransportOptions | None = None,
        *,
        session: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self._listen_on = address
        self._options = options or TransportOptions()
        self._session = session
        self.timeout = timeout
        self.address = ""
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._accepted = threading.Event()
        self._transport: FrameTransport | None = None
        self._failure: list[BaseException] = []
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="trio peer", daemon=True)

    # -- the loop's thread
    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread by accept()
            self._failure.append(exc)
        finally:
            self._ready.set()
            self._accepted.set()

    async def _main(self) -> None:
        listener = await open_listener(self._listen_on, self._options)
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self.address = listener.address
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_one, listener)
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self._transport is not None:
                await self._transport.aclose()
            await listener.aclose()

    async def _accept_one(self, listener: Any) -> None:
        transport: FrameTransport = await listener.accept()
        await transport.do_handshake()
        if self._session:
            await transport.start_session(
                is_server=True, max_frame_size=self._options.max_frame_size
            )
        self._transport = transport
        self._accepted.set()

    # -- the test's threads
    def __enter__(self) -> TrioPeer:
        self._thread.start()
        self._ready.wait(self.timeout)
        self._raise_failure()
        _check(self._token is not None, f"the trio peer did not listen within {self.timeout} s")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass  # the loop has ended already (and said why, if it failed)
        self._thread.join(self.timeout)
        if exc_type is None:
            self._raise_failure()  # the peer's end failed while closing, say

    def _raise_failure(self) -> None:
        if self._failure:
            raise self._failure[0]

    def accept(self) -> None:
        """Wait until the client's connection was accepted (and its session started)."""
        if not self._accepted.wait(self.timeout):
            raise BlockingConformanceFailure(f"no connection accepted within {self.timeout} s")
        self._raise_failure()
        _check(self._transport is not None, "the trio peer stopped before it accepted")

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def bounded() -> Any:
            with trio.fail_after(self.timeout):
                return await fn(*args)

        return trio.from_thread.run(bounded, trio_token=self._token)

    @property
    def transport(self) -> FrameTransport:
        """The accepted trio transport."""
        assert self._transport is not None, "accept() first"
        return self._transport

    def send_frame(self, frame: bytes) -> None:
        self._call(self.transport.send_frame, frame)

    def send_frames(self, frames: Sequence[bytes]) -> None:
        self._call(self.transport.send_frames, list(frames))

    def receive_frame(self) -> bytes:
        frame: bytes = self._call(self.transport.receive_frame)
        return frame

    def receive_frame_with_fds(self) -> tuple[bytes, list[int]]:
        transport = self.transport

        async def both() -> tuple[bytes, list[int]]:
            frame = await transport.receive_frame()
            return frame, transport.take_received_fds()

        result: tuple[bytes, list[int]] = self._call(both)
        return result

    def close(self) -> None:
        self._call(self.transport.aclose)


@contextmanager
def trio_peer_pair(
    address: str,
    max_frame_size: int,
    *,
    server_options: TransportOptions | None = None,
    client_options: TransportOptions | None = None,
    session: bool = False,
    timeout: float = 30.0,
) -> Iterator[tuple[BlockingTransport, TrioPeer]]:
    """A blocking client connected to a trio listener on ``address`` (a :class:`TrioPeer`).

    Both ends get the frame limit ``max_frame_size``; with ``session`` both
    start their session (``shm:`` moves onto the ring) before the pair is
    handed over. The client is closed at the end; the peer's loop stops.
    """
    server_options = server_options or TransportOptions()
    client_options = client_options or TransportOptions()
    server_options.max_frame_size = client_options.max_frame_size = max_frame_size
    with TrioPeer(address, server_options, session=session, timeout=timeout) as peer:
        client = open_blocking_transport(peer.address, client_options)
        try:
            if session:
                client.start_session(max_frame_size)
            peer.accept()
            yield client, peer
        finally:
            client.close()
