"""The trio client's pump: frames between one transport and its core, and who reads when.

A :class:`Pump` serves one :class:`~pcifront.Bus`. It sends each request
(:meth:`Pump.call`) and lets the connection's
:class:`~pcifront.core.session.ClientCore` route every frame that comes back;
everything the frames mean is the core's. What is left here is I/O: one
send lock, a watchdog for the request time-out, failing every waiting request
at once when the connection ends, and deciding who reads the transport.

Who reads the transport (the "turn"):

* A reader task that hands each reply to the waiting caller would put an
  extra pass through the scheduler on the critical path of every request.
  So a caller reads the transport itself whenever nobody else is reading, and
  routes whatever else arrives (other callers' replies, events, DMA calls).
* When it has its reply it passes the turn to the next caller that wants it
  (:attr:`Pump._want`), else back to the reader task, which keeps events
  flowing while no request is outstanding.
* A caller that finds the transport being read waits to be handed its reply
  or the turn; it never interrupts a reader. Only the watchdog and a lost
  connection stop a caller's read (:attr:`Pump._stop_read`): with
  ``interrupt_receive()`` where the transport supports it, else by cancelling
  the cancel scope of that one read (never a scope per request).

The state of the turn, all of it:

============  ==============================================================
``_turn``     who holds it: None (nobody yet), ``_READER`` (the reader task)
              or the :class:`~shared.sync.Call` of the caller reading
``_reader``   the reader task: ``_PARKED``, ``_WOKEN`` (handed the turn, not
              yet running), ``_RUNNING`` (between reads) or ``_READING``
``_want``     callers waiting for the turn, in order
``_stop_read``  how to stop the caller reading now (None: nobody is)
============  ==============================================================
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from pcifront.core.dma import DmaSpace
from pcifront.core.errors import ConnectionLostError, error_for_code
from pcifront.core.routes import BusLink, BusStatistics
from pcifront.core.session import CLOSED_BY_GUEST, ClientCore, ConnectionEnded, transport_ended
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import (
    DeviceAddedEvent,
    DeviceRemovedEvent,
    DmaFaultEvent,
    ErrorReply,
    Event,
    Reply,
    Request,
)
from shared.sync import Call, CallTable, FastLock
from shared.transport import FrameTransport, ReceiveInterrupted

__all__ = ["Pump"]

log = logging.getLogger("pcisplit.frontend")

#: The turn's holder when no caller holds it: the reader task.
_READER = object()
# The reader task's state (Pump._reader).
_PARKED, _WOKEN, _RUNNING, _READING = range(4)


class Pump:
    """Moves one bus's frames between its transport and its core (see the module docstring).

    ``stats``, ``dma``, ``event``, ``fault`` and ``apply_change`` are where the
    core delivers (see :meth:`ClientCore.attach`), with the interrupt routes of
    :attr:`link`; they outlive connections, while :meth:`attach` swaps in a new
    transport and core after a reconnect.
    """

    def __init__(
        self,
        transport: FrameTransport,
        core: ClientCore,
        *,
        timeout: float | None,
        polling: bool,
        stats: BusStatistics,
        dma: DmaSpace,
        event: Callable[[Event], None],
        fault: Callable[[DmaFaultEvent], None],
        apply_change: Callable[[DeviceAddedEvent | DeviceRemovedEvent], None],
    ) -> None:
        #: Bound on each request (None: wait forever).
        self.timeout = timeout
        self._polling = polling  # the transport spins (shm: with poll_us > 0)
        self._stats = stats
        #: What interrupts() blocks and DMA buffers use: requests, features, fd passing,
        #: and the interrupt routes the core posts to.
        self.link = self._link = BusLink(
            self.call,
            features=core.features,
            can_pass_fds=transport.can_pass_fds,
            disable_timeout=10.0 if timeout is None else timeout,
            stats=stats,
        )
        self._dma = dma
        self._event = event
        self._fault = fault
        self._apply_change = apply_change
        self._send_lock = FastLock()
        self._turn: object = None
        self._reader = _RUNNING
        self._want: deque[Call[Reply]] = deque()
        self._stop_read: Callable[[], object] | None = None
        self._reader_idle = trio.lowlevel.ParkingLot()
        self._lost_event = trio.Event()
        self.attach(transport, core)

    # -- the connection -------------------------------------------------------------------

    @property
    def transport(self) -> FrameTransport:
        """The current connection's transport."""
        return self._transport

    @property
    def core(self) -> ClientCore:
        """The current connection's core."""
        return self._core

    @property
    def lost(self) -> str | None:
        """Why the current connection ended; None while it is up."""
        return self._calls.failed

    async def wait_lost(self) -> str:
        """Wait until the first connection ends; returns why."""
        await self._lost_event.wait()
        return self.lost or "connection closed"

    def attach(self, transport: FrameTransport, core: ClientCore) -> None:
        """Serve ``transport`` and ``core`` (a new connection, after a reconnect)."""
        self._transport = transport
        self._interrupt_read = transport.interrupt_receive
        self._core = core
        self._calls: CallTable[Reply] = CallTable(core.full)  # not failed, no calls
        core.attach(
            stats=self._stats, resolve=self._calls.resolve, routes=self._link, dma=self._dma,
            event=self._event, fault=self._fault, apply_change=self._apply_change,
        )
        self._turn, self._reader, self._stop_read = None, _RUNNING, None
        self._want.clear()
        self._link.rebind(features=core.features, can_pass_fds=transport.can_pass_fds)

    async def detach(self) -> None:
        """The connection is gone: close it, end what lived in its backend session."""
        with trio.CancelScope(shield=True):
            await self._transport.aclose()
        self._link.close_all_interrupts(self.lost or "the connection ended")
        self._dma.release_all(self.lost or "the connection ended")
        # Requests woken by fail_all leave the call table as they run; the next
        # connection numbers its requests from 1 again, so wait for them to go.
        for _ in range(1000):
            if not len(self._calls):
                break
            await trio.lowlevel.checkpoint()
        else:
            log.warning(
                "%d requests did not leave after the connection was lost", len(self._calls)
            )

    def fail_all(self, reason: str) -> None:
        """The connection ended (``reason``): every waiting request fails with it."""
        self._calls.fail_all(reason)
        if self._turn is not _READER:
            self._stop_caller_read()
        self._reader_idle.unpark_all()
        self._lost_event.set()
        # What lived in the backend session ends now, loudly (ResourceLostError), also
        # for tasks waiting in irqs.receive(): a reconnect does not bring it back.
        blocks = self._link.close_all_interrupts(reason)
        buffers = self._dma.release_all(reason)
        if blocks or buffers:
            log.warning(
                "connection lost (%s): %d interrupts() block(s) and %d DMA buffer(s) ended; "
                "re-enable and re-map them once connected again", reason, blocks, buffers,
            )

    # -- requests -------------------------------------------------------------------------

    async def call(self, make: Callable[[int], Request], *, fds: list[int] | None = None) -> Reply:
        """Send ``make(request_id)`` on the current connection and return its reply.

        An error reply raises its typed error; a lost connection raises
        :class:`~pcifront.ConnectionLostError` (``request_sent`` says whether
        the request may have reached the backend).
        """
        calls = self._calls
        if calls.failed is not None:
            raise ConnectionLostError(calls.failed, request_sent=False)
        # Parking only when full keeps the common path free of scheduler passes (and,
        # tested here first, of a coroutine call).
        core = self._core
        if core.full():
            await calls.wait_slot()
            if calls.failed is not None:
                raise ConnectionLostError(calls.failed, request_sent=False)
        rid, frame = core.request(make)  # a bad argument raises here: nothing is sent
        call = calls.open(rid, trio.current_time())
        stats = self._stats
        if len(calls) > stats.max_in_flight_seen:
            stats.max_in_flight_seen = len(calls)
        try:
            await self.send(frame, fds)
            await self._await_reply(call)
        finally:
            # On cancellation the reply may still come; the routing counts it as late.
            calls.close(call)
        reply = call.result
        if reply is None:
            raise ConnectionLostError(calls.failed or "connection closed", request_sent=True)
        if isinstance(reply, ErrorReply):
            stats.errors_received += 1
            raise error_for_code(reply.code, reply.message)
        return reply

    async def send(self, frame: bytes, fds: list[int] | None = None) -> None:
        """Send one frame (with ``fds``), in turn with every other sender."""
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()  # free: no coroutine, no checkpoint
        try:
            if fds:
                await self._transport.send_frame_with_fds(frame, fds)
            else:
                await self._transport.send_frame(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.fail_all(f"connection to the backend lost while sending: {exc}")
            raise ConnectionLostError(self.lost or str(exc), request_sent=True) from exc
        finally:
            lock.release()

    async def watchdog(self) -> None:
        """Fail requests that waited longer than the timeout (a task per connection).

        One task checking a few times per timeout period is far cheaper than a
        cancel scope around every request on the hot path.
        """
        timeout = self.timeout
        if timeout is None:
            return
        while True:
            await trio.sleep(max(timeout / 4, 0.01))
            deadline = trio.current_time() - timeout
            for call in self._calls:
                if call.started < deadline and call.result is None:
                    self._calls.complete(call, ErrorReply(
                        0,
                        ErrorCode.TIMED_OUT,
                        f"no reply from the backend within {timeout} s; it may be overloaded "
                        "or stuck (raise timeout= in connect() if this is expected)",
                    ))
                    if self._turn is call:
                        self._stop_caller_read()  # it was reading for itself: stop

    # -- the turn to read -----------------------------------------------------------------

    async def _await_reply(self, call: Call[Reply]) -> None:
        """Wait for ``call``'s reply, reading the transport ourselves when we can."""
        calls = self._calls
        try:
            while call.result is None and calls.failed is None:
                turn = self._turn
                if (
                    turn is None
                    or turn is call
                    or (turn is _READER and self._reader != _READING)
                ):
                    # Free, handed to us, or the reader task was woken but has not
                    # started reading yet: read for ourselves (it parks again).
                    self._turn = call
                    await self._read_until(call)
                    continue
                self._want.append(call)
                try:
                    await calls.wait(call)
                finally:
                    if call in self._want:
                        self._want.remove(call)
        finally:
            if self._turn is call:
                self._pass_turn()

    def _pass_to_wanter(self) -> bool:
        """Hand the turn to the first caller still waiting for it."""
        want = self._want
        while want:
            call = want.popleft()
            if call.waiting and call.result is None:
                self._turn = call
                self._calls.wake(call)
                return True
        return False

    def _pass_turn(self) -> None:
        """The current caller stops reading: the next waiting caller reads, else the reader."""
        if not self._pass_to_wanter():
            self._turn = _READER
            if self._reader_idle.unpark():
                self._reader = _WOKEN

    async def _read_until(self, call: Call[Reply]) -> None:
        """Holding the turn: route frames until ``call`` has its reply."""
        transport = self._transport
        if self._polling and self._reader == _WOKEN:
            # A polling transport never spins while another task is runnable; let the
            # reader task we woke run (and park again) first, so that the spin can.
            await trio.lowlevel.cancel_shielded_checkpoint()
        receive = self._receive_interruptibly if transport.interruptible else self._receive_in_scope
        while call.result is None and self._calls.failed is None:
            try:
                frame = await receive()
            except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._receive_failed(exc)
                return
            if frame is not None:
                await self._on_frames(frame)

    async def _receive_interruptibly(self) -> bytes | None:
        """A caller's own read, stopped with ``interrupt_receive()`` (None then): no
        cancel scope per read, which costs about as much as a scheduler pass."""
        self._stop_read = self._interrupt_read
        try:
            return await self._transport.receive_frame()
        except ReceiveInterrupted:
            return None
        finally:
            self._stop_read = None

    async def _receive_in_scope(self) -> bytes | None:
        """A caller's own read on a transport that cannot be interrupted: stopped by
        cancelling its cancel scope (None then)."""
        with trio.CancelScope() as scope:
            self._stop_read = scope.cancel
            try:
                return await self._transport.receive_frame()
            finally:
                self._stop_read = None
        return None

    def _stop_caller_read(self) -> None:
        """Stop a caller blocked reading the transport for itself (it re-checks why)."""
        stop = self._stop_read
        if stop is not None:
            stop()

    # -- receiving ------------------------------------------------------------------------

    async def _on_frames(self, frame: bytes) -> int:
        """Let the core route ``frame`` and every frame already buffered after it (no
        pass each), sending what it answers. Returns how many replies it handed out.
        """
        transport = self._transport
        receive = self._core.receive
        stats = self._stats
        before = stats.replies_received
        try:
            next_frame: bytes | None = frame
            while next_frame is not None:
                answer = receive(next_frame)
                if answer is not None:
                    await self.send(answer)  # a DMA result or hot-plug ack, in order
                next_frame = transport.receive_frame_nowait()
        except ConnectionEnded as exc:
            self.fail_all(exc.reason)
        except ConnectionLostError:
            pass  # sending an answer found the connection gone; send() recorded why
        return stats.replies_received - before

    def _receive_failed(self, exc: BaseException) -> None:
        self.fail_all(transport_ended(isinstance(exc, trio.EndOfChannel), exc))

    async def receive_loop(self) -> None:
        """The reader task: reads while no caller does (events flow between requests).

        Returns when the connection has ended (never raises for that).
        """
        transport = self._transport
        try:
            while self._calls.failed is None:
                self._reader = _RUNNING
                turn = self._turn
                if turn is not None and turn is not _READER:
                    self._reader = _PARKED
                    await self._reader_idle.park()
                    continue
                if self._pass_to_wanter():
                    continue
                self._turn = _READER
                self._reader = _READING
                try:
                    delivered = await self._on_frames(await transport.receive_frame())
                finally:
                    self._reader = _RUNNING
                if delivered:
                    # The callers just handed their replies run in this pass; one that
                    # sends again finds the transport free and reads for itself.
                    await trio.lowlevel.cancel_shielded_checkpoint()
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._receive_failed(exc)

    async def close(self) -> None:
        """Say goodbye, fail what still waits, close the transport. Idempotent."""
        goodbye = self._core.goodbye() if self.lost is None else None
        if goodbye is not None:
            with trio.move_on_after(1):
                try:
                    await self.send(goodbye)
                except PcisplitError:
                    pass  # already gone (ConnectionLostError...): nothing to say goodbye to
        self.fail_all(CLOSED_BY_GUEST)
        await self._transport.aclose()
        self._dma.release_all("the guest closed the bus")
