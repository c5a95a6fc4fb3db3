"""The ``shm:`` transport: frames over a shared-memory ring, doorbells on eventfds.

Bootstrap (address ``shm:/path/to.sock``):

1. The client connects to a UNIX stream socket. Until :meth:`start_session`
   the transport is a plain framed socket, so both sides run the normal
   protocol handshake over it.
2. ``start_session``: the client creates a sealed memfd holding one ring per
   direction plus two eventfds (one doorbell per side) and sends them with a
   setup frame through SCM_RIGHTS. The server checks everything it received
   (fd kinds, seals, sizes, geometry) and acknowledges.
3. From then on frames travel on the ring. The socket stays open as the
   liveness signal: a goodbye frame then EOF is a clean close; EOF without the
   goodbye means the peer died. Either way no ring operation can hang.

File descriptors (:meth:`ShmTransport.send_frame_with_fds`): before the
session starts they ride on the socket frames exactly as on ``unix:``. After
it, frames travel on the ring but fds can only travel on the socket, so the
sender first sends a control frame ``FDS seq`` carrying the fds, where
``seq`` is the number (counted from 0 at session start) of the ring frame
they belong to; the receiver's socket task files them under ``seq`` and
answers ``FDA seq``; only then does the sender put the frame on the ring. The
acknowledgement makes the fds reach the receiver before their frame can, so
the ring's hot path only tests one flag and never makes a syscall. Fd frames
are rare control operations (interrupt enable, DMA map), so their extra
round trip costs nothing that matters. Cancelling such a send after the
control frame went out breaks the transport (the receiver would otherwise
tie the fds to the wrong frame), like a send cancelled mid-frame on a stream.

The control socket is a :class:`~shared.transport._stream.UnixFrameTransport`
that the shm transport owns (:attr:`ShmTransport.control`): framing, fd
passing and its caps, the receive limits (idle partial frame, buffer budget),
SO_PEERCRED identity and the translation of EOF and socket errors are the
``unix:`` transport's, written once. This module adds only what is shm's: the
ring, the doorbells and the FDS/FDA/goodbye control frames. The setup
exchange and its validation are in ``_shm_setup``; the doorbell's sleeper
(:class:`~shared.transport._shm_parts.Doorbell`) and the fds announced for
ring frames (:class:`~shared.transport._shm_parts.RingFds`) in ``_shm_parts``.

The peer is untrusted: ring corruption is detected in C (see ``ring.h``) and
turns into :class:`trio.BrokenResourceError` for this connection only.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from shared.errors import LimitExceededError
from shared.ring import (
    RecordTooLargeError,
    RingCorruptError,
    RingError,
    RingFullError,
)
from shared.sync import ConflictDetector
from shared.transport._base import (
    RECEIVE_CONFLICT,
    SEND_CONFLICT,
    FrameTooLargeError,
    FrameTransport,
    ReceiveInterrupted,
    TransportOptions,
)
from shared.transport._fdpass import MAX_FDS_PER_FRAME, check_fds_argument
from shared.transport._identity import PeerIdentity
from shared.transport._shm_parts import Doorbell, RingFds
from shared.transport._shm_setup import (
    _FDS_ACK,
    _FDS_MARK,
    _GOODBYE,
    _SEQ,
    _YIELD_EVERY,
    ShmStatistics,
    _close_fds,
    _Session,
    accept_setup,
    offer_setup,
)
from shared.transport._stream import UnixFrameTransport

__all__ = ["ShmTransport", "ShmStatistics", "DEFAULT_POLL_US"]

#: Adaptive-polling budget when ``TransportOptions.poll_us`` is None (see docs/transports.md).
DEFAULT_POLL_US = 0.0

class ShmTransport(FrameTransport):
    """One end of a ``shm:`` connection. Built by :func:`connect_shm` or a listener."""

    interruptible = True

    def __init__(self, stream: trio.SocketStream, options: TransportOptions, *, name: str) -> None:
        # The control socket, with the server's limits on what the peer makes us hold there.
        self._control = UnixFrameTransport(
            stream, max_frame_size=options.max_frame_size, name=name, options=options
        )
        self._options = options
        self._name = name
        self.max_frame_size = options.max_frame_size
        # After session start: fds announced for ring frames, tied to them on receipt.
        self._ring_fds = RingFds(MAX_FDS_PER_FRAME if options.max_fds is None else options.max_fds)
        self._control_lock = trio.Lock()
        self._fd_ack_wanted: int | None = None
        self._fd_ack_event: trio.Event | None = None
        self._closed = False
        self._broken: str | None = None
        # One sender and one receiver at a time (shared.sync.ConflictDetector), spelled out
        # on the detectors' fields (_claim_send, receive_frame): a with block would be two
        # Python calls per frame on the request path (see shared/sync/_conflict.py).
        self._send_conflicts = ConflictDetector(SEND_CONFLICT)
        self._receive_conflicts = ConflictDetector(RECEIVE_CONFLICT)
        self._session: _Session | None = None
        self._peer_gone = False
        self._peer_reason: str | None = None  # None: clean goodbye
        self._peer_cause: Exception | None = None  # a limit the peer went over, if that was it
        self._doorbell = Doorbell()
        self._interrupt = False
        self._watch_scope = trio.CancelScope()
        poll_us = DEFAULT_POLL_US if options.poll_us is None else options.poll_us
        if poll_us < 0:
            raise ValueError(f"poll_us must be >= 0, not {poll_us}")
        self._poll_ns = int(poll_us * 1000)
        timeout = options.extra.get("shm_send_timeout")
        self._send_timeout: float | None = None if timeout is None else float(timeout)
        self._initial_index = int(options.extra.get("shm_initial_index", 0))
        self._frames_sent = 0
        self._frames_received = 0
        self._doorbells_sent = 0
        self._spin_hits = 0
        self._spin_misses = 0
        self._space_waits = 0

    # ------------------------------------------------------------------ info
    @property
    def session_started(self) -> bool:
        """True once frames travel on the ring."""
        return self._session is not None

    @property
    def can_pass_fds(self) -> bool:
        return not self._closed

    def describe(self) -> str:
        return self._name

    @property
    def control(self) -> UnixFrameTransport:
        """The composed control-socket transport (handshake, setup, fds, liveness).

        Exposed for inspection and tests; sending or receiving on it directly
        would confuse the shm bootstrap.
        """
        return self._control

    def peer_identity(self) -> PeerIdentity:
        """The control socket's SO_PEERCRED identity (:meth:`UnixFrameTransport.peer_identity`)."""
        return self._control.peer_identity()

    def statistics(self) -> ShmStatistics:
        """Frames and doorbells so far; ``doorbell_sleeps`` counts real sleeps."""
        return ShmStatistics(
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            doorbells_sent=self._doorbells_sent,
            doorbell_sleeps=self._doorbell.sleeps,
            spin_hits=self._spin_hits,
            spin_misses=self._spin_misses,
            space_waits=self._space_waits,
        )

    def set_max_frame_size(self, size: int) -> None:
        session = self._session
        if session is not None and size > session.layout.max_record:
            raise FrameTooLargeError(
                f"cannot raise the frame limit to {size} bytes after the session started; "
                f"the ring was set up for {session.layout.max_record}-byte frames"
            )
        self.max_frame_size = size
        self._control.set_max_frame_size(size)

    # ------------------------------------------------------------------ control socket
    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this shm transport was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    def _claim_send(self, frames: Sequence[bytes]) -> None:
        """The checks every send makes, then take the send slot (the caller releases it)."""
        if self._closed or self._broken is not None:
            self._check_usable()  # raises the right error
        for frame in frames:
            if len(frame) > self.max_frame_size:
                raise FrameTooLargeError(
                    f"frame of {len(frame)} bytes exceeds the {self.max_frame_size}-byte limit; "
                    "send smaller messages or negotiate a larger max_message_size"
                )
        sending = self._send_conflicts
        if sending.held:
            raise sending.error()
        sending.held = True

    async def _socket_send_frame(self, frame: bytes, fds: list[int] | None = None) -> None:
        """Before the session: one frame on the control socket, exactly as on ``unix:``."""
        self._claim_send((frame,))
        try:
            if fds is None:
                await self._control.send_frame(frame)
            else:
                await self._control.send_frame_with_fds(frame, fds)
        finally:
            self._send_conflicts.held = False

    async def _socket_receive_frame(self) -> bytes:
        self._check_usable()
        with self._receive_conflicts:
            return await self._control.receive_frame()

    async def send_frame_with_fds(self, frame: bytes, fds: Sequence[int]) -> None:
        """Send ``frame`` with ``fds`` attached; before or after the session started.

        After the session started the fds travel on the control socket, tied to
        the frame's ring sequence number (see the module docstring).
        """
        fd_list = check_fds_argument(fds)
        session = self._session
        if session is None:
            await self._socket_send_frame(frame, fd_list)
            return
        self._claim_send((frame,))
        announced = False
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            seq = self._frames_sent  # the ring frame that will carry `frame`
            event = trio.Event()
            self._fd_ack_wanted, self._fd_ack_event = seq, event
            async with self._control_lock:
                announced = True
                await self._control.send_frame_with_fds(_FDS_MARK + _SEQ.pack(seq), fd_list)
            with trio.fail_after(self._send_timeout or float("inf")):
                await event.wait()
            if self._peer_gone:
                raise trio.BrokenResourceError(
                    self._peer_reason or "peer closed the connection; cannot send"
                )
            self._check_usable()
            await self._ring_send(session, frame)
        except trio.TooSlowError as exc:
            raise self._fail(
                f"the peer did not acknowledge file descriptors within {self._send_timeout} s",
                exc,
            ) from exc
        except trio.Cancelled:
            if announced:
                # The peer holds fds for ring frame `seq`; a different frame would get them.
                self._broken = "a send with file descriptors was cancelled midway; reconnect"
                self._wake_waiters()
            raise
        finally:
            self._fd_ack_wanted = self._fd_ack_event = None
            self._send_conflicts.held = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    def take_received_fds(self) -> list[int]:
        if self._session is None:
            return self._control.take_received_fds()
        return self._ring_fds.take()

    async def _on_fds_announced(self, frame: bytes, fds: list[int]) -> str | None:
        """Socket task: file the ``fds`` of an ``FDS seq`` frame and acknowledge it.

        Returns why the peer must be dropped, or None.
        """
        if len(frame) != len(_FDS_MARK) + _SEQ.size or not fds:
            _close_fds(fds)
            return "peer sent a malformed file-descriptor announcement on the shm socket"
        (seq,) = _SEQ.unpack_from(frame, len(_FDS_MARK))
        refused = self._ring_fds.file(seq, fds, self._frames_received)
        if refused is not None:
            problem, self._peer_cause = refused
            return problem
        async with self._control_lock:
            await self._control.send_frame(_FDS_ACK + _SEQ.pack(seq))
        return None

    def _on_fds_acknowledged(self, frame: bytes) -> str | None:
        if len(frame) == len(_FDS_ACK) + _SEQ.size:
            (seq,) = _SEQ.unpack_from(frame, len(_FDS_ACK))
            if seq == self._fd_ack_wanted and self._fd_ack_event is not None:
                self._fd_ack_event.set()
                return None
        return "peer acknowledged file descriptors nobody sent"

    # ------------------------------------------------------------------ session setup
    async def start_session(self, *, is_server: bool, max_frame_size: int) -> None:
        """Move the session onto the ring (both sides call this after the handshake)."""
        self._check_usable()
        if self._session is not None:
            raise trio.BusyResourceError("the shm session was already started")
        sending, receiving = self._send_conflicts, self._receive_conflicts
        if sending.held or receiving.held:
            raise trio.BusyResourceError("cannot start the session while a send or receive runs")
        self.set_max_frame_size(max_frame_size)
        sending.held = receiving.held = True
        try:
            if is_server:
                session = await accept_setup(self._control, max_frame_size)
            else:
                session = await offer_setup(
                    self._control, self._options.ring_size, max_frame_size, self._initial_index
                )
        except (RingError, OSError, ValueError) as exc:
            self._broken = f"shm session setup failed: {exc}"
            raise trio.BrokenResourceError(self._broken) from exc
        except trio.BrokenResourceError as exc:
            self._broken = str(exc)
            raise
        finally:
            sending.held = receiving.held = False
            _close_fds(self._control.take_received_fds())  # a hostile ack's fds, say
        self._session = session
        trio.lowlevel.spawn_system_task(self._watch_peer, name=f"{self._name} liveness")

    # ------------------------------------------------------------------ liveness
    async def _watch_peer(self) -> None:
        """System task: the control socket's EOF is the peer's death certificate.

        It is the control transport's only receiver once the session started,
        so that transport's limits (frame size, fd caps, idle partial frame,
        buffer budget) keep applying to whatever the peer sends there.
        """
        reason: str | None = "peer closed the shm control socket without saying goodbye (died?)"
        with self._watch_scope:
            try:
                while True:
                    frame, fds = await self._control.receive_frame_with_fds()
                    if frame.startswith(_FDS_MARK):
                        problem = await self._on_fds_announced(frame, fds)
                        fds = []
                    elif frame.startswith(_FDS_ACK):
                        problem = self._on_fds_acknowledged(frame)
                    elif frame == _GOODBYE:
                        reason = None
                    else:
                        problem = (
                            f"peer sent an unexpected {len(frame)}-byte frame on the shm "
                            "control socket"
                        )
                    _close_fds(fds)  # only an announcement may carry fds
                    if reason is None:
                        break
                    if problem is not None:
                        reason = problem
                        break
            except trio.EndOfChannel:
                pass
            except (trio.BrokenResourceError, OSError) as exc:
                reason = f"shm control socket broke: {exc}"
                if isinstance(exc.__cause__, LimitExceededError):
                    self._peer_cause = exc.__cause__
            except trio.ClosedResourceError:
                return  # we closed it ourselves
            finally:
                self._control.close_received_fds()  # nobody announced them properly
            self._peer_gone = True
            self._peer_reason = reason
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        session = self._session
        self._doorbell.wake(None if session is None else session.rx_port)
        if self._fd_ack_event is not None:
            self._fd_ack_event.set()

    def interrupt_receive(self) -> None:
        """Make a blocked :meth:`receive_frame` raise :class:`ReceiveInterrupted`."""
        if self._receive_conflicts.held:
            self._interrupt = True
            self._wake_waiters()

    def _fail(self, message: str, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = message
        self._wake_waiters()
        error = trio.BrokenResourceError(message)
        error.__cause__ = exc
        return error

    def _ring_doorbell(self, session: _Session) -> None:
        try:
            session.tx_port.notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._fail(f"cannot ring the peer's doorbell: {exc}", exc) from exc
        self._doorbells_sent += 1

    # ------------------------------------------------------------------ frames
    async def send_frame(self, frame: bytes) -> None:
        session = self._session
        if session is None:
            await self._socket_send_frame(frame)
            return
        self._claim_send((frame,))
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._ring_send(session, frame)
        finally:
            self._send_conflicts.held = False
        # Always a cancellation point (above); a schedule point only every
        # _YIELD_EVERY frames: a scheduler round trip per frame doubled the QD1
        # round trip in measurements, and a full ring makes us sleep anyway.
        if self._frames_sent % _YIELD_EVERY == 0:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _ring_send(self, session: _Session, frame: bytes) -> None:
        """Put one frame on the ring, waiting for space. The caller holds the send side."""
        length = len(frame)
        producer = session.producer
        deadline: float | None = None
        while True:
            if self._closed or self._broken is not None:
                self._check_usable()  # raises the right error
            if self._peer_gone:
                raise trio.BrokenResourceError(
                    self._peer_reason or "peer closed the connection; cannot send"
                )
            try:
                # One C call writes and publishes the record: a frame is on the
                # ring whole or not at all, so cancellation cannot tear it.
                notify = producer.send_nowait(frame)
            except RingFullError:
                if producer.prepare_wait_space(length):
                    continue
                self._space_waits += 1
                if deadline is None:
                    timeout = self._send_timeout
                    deadline = trio.current_time() + timeout if timeout else float("inf")
                with trio.move_on_at(deadline) as waited:
                    await self._doorbell.wait(session.rx_port)
                if waited.cancelled_caught:
                    err = TimeoutError(f"ring full for {self._send_timeout} s")
                    raise self._fail(
                        f"the peer consumed nothing for {self._send_timeout} s while the ring "
                        "was full; disconnecting it", err,
                    ) from err
                continue
            except RecordTooLargeError as exc:
                raise FrameTooLargeError(str(exc)) from exc
            except RingCorruptError as exc:
                raise self._fail(str(exc), exc) from exc
            break
        if notify:
            self._ring_doorbell(session)
        self._frames_sent += 1

    async def send_frames(self, frames: list[bytes]) -> None:
        """Send several frames, publishing them together: at most one doorbell per batch.

        When the ring fills up the frames written so far are published and the
        rest wait for space. On cancellation a prefix of ``frames`` was sent,
        each frame whole.
        """
        session = self._session
        if session is None:
            for frame in frames:
                await self._socket_send_frame(frame)
            return
        self._claim_send(frames)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            producer = session.producer
            done = 0
            while done < len(frames):
                self._check_usable()
                if self._peer_gone:
                    raise trio.BrokenResourceError(
                        self._peer_reason or "peer closed the connection; cannot send"
                    )
                try:
                    while done < len(frames):
                        producer.write_nowait(frames[done])
                        done += 1
                        self._frames_sent += 1
                except RingFullError:
                    pass  # publish what fits, then wait for space below
                except RingCorruptError as exc:
                    raise self._fail(str(exc), exc) from exc
                # Published before any await: cancellation never strands written records.
                if producer.publish():
                    self._ring_doorbell(session)
                if done < len(frames) and not producer.prepare_wait_space(len(frames[done])):
                    self._space_waits += 1
                    await self._doorbell.wait(session.rx_port)
        finally:
            self._send_conflicts.held = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _take_ring_frame(self, session: _Session) -> bytes | None:
        """The next frame on the receive ring, copied out once, or None (no await)."""
        try:
            item = session.consumer.receive_nowait()
        except RingCorruptError as exc:
            raise self._fail(str(exc), exc) from exc
        if item is None:
            return None
        frame, wake_producer = item
        if wake_producer:
            self._ring_doorbell(session)
        if self._ring_fds.active:
            self._ring_fds.tie(self._frames_received)
        self._frames_received += 1
        return frame

    def receive_frame_nowait(self) -> bytes | None:
        session = self._session
        if (
            session is None
            or self._receive_conflicts.held
            or self._closed
            or self._broken is not None
        ):
            return None
        try:
            return self._take_ring_frame(session)
        except trio.BrokenResourceError:
            return None  # the connection is now broken; the next receive_frame says so

    async def receive_frame(self) -> bytes:
        session = self._session
        if session is None:
            return await self._socket_receive_frame()
        self._check_usable()
        receiving = self._receive_conflicts
        if receiving.held:
            raise receiving.error()
        receiving.held = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            consumer = session.consumer
            slept = False
            while True:
                if self._closed or self._broken is not None:
                    self._check_usable()  # raises the right error
                gone = self._peer_gone  # read before the ring: frames sent before death count
                got = self._take_ring_frame(session)
                if got is not None:
                    frame = got
                    break
                if gone:
                    if self._peer_reason is None:
                        raise trio.EndOfChannel("peer closed the connection")
                    raise trio.BrokenResourceError(self._peer_reason) from self._peer_cause
                # Spin only when no other task of this process could run: the spin
                # holds the thread, so spinning while (say) the task waiting for the
                # frame just handed over is runnable would delay it by the whole budget.
                if self._poll_ns and not trio.lowlevel.current_statistics().tasks_runnable:
                    if consumer.spin(self._poll_ns):
                        self._spin_hits += 1
                        continue
                    self._spin_misses += 1
                if consumer.prepare_wait():
                    continue
                slept = True
                await self._doorbell.wait(session.rx_port)
                if self._interrupt:
                    self._interrupt = False
                    raise ReceiveInterrupted("receive_frame was interrupted; nothing was consumed")
        finally:
            self._interrupt = False
            receiving.held = False
        if not slept and self._frames_received % _YIELD_EVERY == 0:
            # Sleeping on the doorbell was already a full checkpoint. A frame that was
            # already there (a pipelined burst, or one a polling spin caught) costs a
            # scheduler pass only once per _YIELD_EVERY frames, like a send: a pass per
            # frame was about a third of a polling backend's time per request. It is
            # always a cancellation point (checkpoint_if_cancelled above).
            await trio.lowlevel.cancel_shielded_checkpoint()
        return frame

    # ------------------------------------------------------------------ close
    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._watch_scope.cancel()
        self._wake_waiters()
        session, self._session = self._session, None
        if session is not None and not self._peer_gone and self._broken is None:
            # Best effort: without the goodbye the peer reports our close as a death.
            self._control.send_frame_nowait(_GOODBYE)
        self._ring_fds.close()
        if session is not None:
            session.close()
        # Closes the socket, its fds and its share of the receive budget before it checkpoints.
        await self._control.aclose()
