"""One guest connection on the backend: requests in, replies, events and DMA calls out.

A :class:`GuestSession` owns the connection after the handshake. Everything it
sends - replies, ``InterruptEvent``s, ``DmaFaultEvent``s, ``DmaReadCall``/
``DmaWriteCall`` - goes through :meth:`GuestSession.send`, the one send path
(a lock that is taken without a scheduler round trip when free, so the request
hot path costs no more than before). Its receive loop answers requests in
order and routes each ``DmaCallResult`` to the device task waiting for it.

Requests that may wait on the guest itself (``DmaUnmapRequest`` waits for
in-flight DMA, which may be a DMA call only this loop can complete) are
answered from a task, so the loop never deadlocks on its own guest; the
dispatcher's table says which (``answer_in_task``) and which requests take
file descriptors from their frame (``takes_fds``).

What is never sent
------------------
A reply or event can be ready after the connection stopped carrying them:
replies computed for a burst that ended with the guest's Goodbye or a fatal
frame, an unmap answered after the guest broke the protocol, an interrupt
that fires as the guest leaves. The send path asks the connection
(``Connection.can_send``) under the send lock and **drops** such a message,
counting it (``replies_dropped``, ``events_dropped``) and logging the totals
once when the session ends; it never raises. A guest that said Goodbye does
not read them, and one that broke the protocol is owed nothing but a Goodbye.
A reply larger than the guest's ``max_message_size`` becomes an
``ErrorReply`` that says so (``Connection.send_reply``); an event too large
for it is dropped and counted.

When the connection ends, however it ends: pending DMA calls fail at once,
the transport is closed (unblocking any sender), the session's interrupt
bindings are dropped and its DMA windows are torn down after their in-flight
DMA has finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from pciback._ratelog import RateLimitedLog, ScopedLog
from pciback.devices import DmaFaultError
from pciback.guests.dispatch import Dispatcher, FdPassing
from pciback.guests.fairness import FairTurns
from pciback.plane.dma import DmaTimeoutError, GuestDma
from pciback.plane.hotplug import SessionChanges
from pciback.plane.irq import InterruptOutbox, IrqRouter
from shared.errors import ErrorCode, LocalProtocolError, PcisplitError, RemoteProtocolError
from shared.evtchn import EventfdStalledError
from shared.protocol import (
    Connection,
    DeviceChangeAck,
    DmaCallResult,
    DmaFaultEvent,
    DmaReadCall,
    DmaWriteCall,
    Goodbye,
    Message,
    MessageTooLargeError,
    Reply,
    Request,
)
from shared.sync import CallTable, FastLock
from shared.transport import FrameTransport

if TYPE_CHECKING:
    from pciback.guests.statistics import BackendStatistics
    from pciback.plane.registry import DeviceRegistry

__all__ = ["GuestSession", "SessionStatistics"]

log = logging.getLogger("pcisplit.backend")

#: DMA fault events queued for a guest that is slow to read them; more are counted, not sent.
FAULT_QUEUE = 64


@dataclass
class SessionStatistics:
    requests: int = 0
    events_sent: int = 0
    dma_calls: int = 0
    dma_call_timeouts: int = 0
    late_call_results: int = 0
    faults_reported: int = 0
    faults_dropped: int = 0
    fds_received: int = 0
    #: Replies and events ready after the connection stopped carrying them (see the module).
    replies_dropped: int = 0
    events_dropped: int = 0


#: Most replies answered as one batch before they are sent (bounds reply latency).
REPLY_BATCH = 32


class GuestSession:
    """The backend's side of one connection, after a successful handshake."""

    def __init__(
        self,
        transport: FrameTransport,
        conn: Connection,
        *,
        registry: DeviceRegistry,
        router: IrqRouter,
        dma: GuestDma,
        backend_stats: BackendStatistics,
        number: int = 0,
        guest_log: RateLimitedLog | None = None,
        max_fds: int | None = None,
        fair: FairTurns | None = None,
    ) -> None:
        assert conn.guest is not None
        self.guest: str = conn.guest
        #: This connection's number (``Backend`` counts sessions from 1), for the logs.
        self.number = number
        #: Guest-triggered log lines of this connection: rate-limited per kind, counted,
        #: summarised (pciback/_ratelog.py).
        limiter = guest_log if guest_log is not None else RateLimitedLog(log)
        #: Lines about the guest's connections, rate-limited per guest (not per connection,
        #: so a guest reconnecting in a loop cannot grow the log either).
        self.guest_events: ScopedLog = limiter.scoped(f"guest {self.guest}")
        self.events: ScopedLog = limiter.scoped(
            f"guest {self.guest} (connection {number})"
        )
        self.transport = transport
        self.conn = conn
        self.router = router
        self.dma = dma
        self.outbox: InterruptOutbox = router.outbox(self.guest)
        self.dispatcher = Dispatcher(
            registry,
            self.guest,
            router=router,
            outbox=self.outbox,
            dma=dma,
            dma_owner=self,
            fd_passing=FdPassing(transport.can_pass_fds, transport.describe()),
            events=self.events,
            refused=backend_stats.requests_refused,
            max_fds=max_fds,
            limit_events=backend_stats.limits_exceeded,
        )
        self.stats = SessionStatistics()
        self._backend_stats = backend_stats
        #: Shared by the backend's sessions: orders bursts while several guests are busy.
        self._fair = fair if fair is not None else FairTurns()
        self._send_lock = FastLock()
        # DMA calls awaiting the frontend's results; the Connection counts a call until
        # its result comes (also after a time-out), so its limit decides when we are full.
        self._calls: CallTable[DmaCallResult] = CallTable(
            lambda: len(conn.outstanding_calls) >= conn.peer_limits.max_in_flight
        )
        self._closed: str | None = None
        self._faults_in, self._faults_out = trio.open_memory_channel[DmaFaultEvent](FAULT_QUEUE)
        #: Hot-plug announcements to this guest and their acknowledgements.
        self.changes = SessionChanges(conn, self.send)
        dma.add_session(self)

    def statistics(self) -> SessionStatistics:
        return self.stats

    def held_fds(self) -> int:
        """Fds this connection keeps after their hand-over (``limits.max_fds_per_connection``)."""
        return self.dispatcher.held_fds()

    @property
    def can_pass_fds(self) -> bool:
        return self.transport.can_pass_fds

    # -- the one send path ------------------------------------------------------------

    async def send(self, msg: Message) -> bool:
        """Encode and send ``msg``; replies, events and calls are serialised here.

        Returns False when the connection no longer carries ``msg`` (it is
        dropped and counted, see the module docstring). A
        :class:`~shared.sync.FastLock`: uncontended (the request hot path) it
        costs two attribute writes and no checkpoint.
        """
        async with self._send_lock:
            # Encoded under the lock: the state cannot change between the check and the send.
            frame = self._encode(msg)
            if frame is None:
                return False
            await self.transport.send_frame(frame)
            return True

    def _encode(self, msg: Message) -> bytes | None:
        """The frame for ``msg``, or None (counted) if the connection cannot carry it now."""
        conn = self.conn
        if not conn.can_send(msg):
            self._drop(msg)
            return None
        if isinstance(msg, Reply):
            return conn.send_reply(msg)
        try:
            return conn.send(msg)
        except MessageTooLargeError as exc:
            # An event the guest's max_message_size cannot take (a long fault text).
            self.events.log(
                "events too large for the guest",
                logging.INFO,
                "%s: guest %s: not sent: %s",
                self.transport.describe(),
                self.guest,
                exc,
            )
            self._drop(msg)
            return None

    def _drop(self, msg: Message) -> None:
        if isinstance(msg, Reply):
            self.stats.replies_dropped += 1
            self._backend_stats.replies_dropped += 1
        else:
            self.stats.events_dropped += 1
            self._backend_stats.events_dropped += 1

    def take_fds(self) -> list[int]:
        """The fds that came with the frame just received (the caller owns them)."""
        fds = self.transport.take_received_fds()
        self.stats.fds_received += len(fds)
        return fds

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the guest says goodbye or the connection fails (the error propagates)."""
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_interrupts, name=f"{self.guest}:irq-outbox")
                nursery.start_soon(self._pump_faults, name=f"{self.guest}:dma-faults")
                nursery.start_soon(self._pump_changes, name=f"{self.guest}:hotplug")
                try:
                    await self._receive_loop(nursery)
                except Exception as exc:  # noqa: BLE001 - re-raised below, outside the nursery
                    error = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._close(str(error) if error else "the guest disconnected")
        if error is not None:
            raise error

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        transport, conn, dispatcher = self.transport, self.conn, self.dispatcher
        stats, backend_stats = self.stats, self._backend_stats
        fair = self._fair
        replies: list[Reply] = []
        while True:
            frame: bytes | None = await transport.receive_frame()
            # While other guests are busy too, wait for this guest's fair turn (no
            # checkpoint otherwise); the turn covers reading and dispatching, not sending.
            await fair.acquire(self)
            served = 0
            try:
                # Answer every request that already arrived (pipelined guests send bursts),
                # then send the replies as one batch: one write or one doorbell.
                while frame is not None:
                    try:
                        msg = conn.receive(frame)
                    except RemoteProtocolError as exc:
                        backend_stats.protocol_errors += 1
                        answer = conn.error_reply_for(exc)
                        if answer is None:
                            await self._flush(replies)
                            await self._goodbye(exc)
                            raise
                        self.events.log(
                            "bad requests",
                            logging.INFO,
                            "%s: guest %s sent a bad request: %s",
                            transport.describe(),
                            self.guest,
                            exc,
                        )
                        replies.append(answer)
                    else:
                        if isinstance(msg, Request):
                            served += 1
                            stats.requests += 1
                            backend_stats.requests += 1
                            entry = dispatcher.handler(type(msg))
                            if entry is not None and entry.answer_in_task:
                                nursery.start_soon(self._answer_later, msg)
                            elif entry is not None and entry.takes_fds:
                                replies.append(await dispatcher.dispatch(msg, self.take_fds()))
                            else:
                                replies.append(await dispatcher.dispatch(msg))
                        elif isinstance(msg, DmaCallResult):
                            self._resolve(msg)
                        elif isinstance(msg, DeviceChangeAck):
                            self.changes.acknowledged(msg)
                        elif isinstance(msg, Goodbye):
                            await self._flush(replies)
                            self.guest_events.log(
                                "connections",
                                logging.INFO,
                                "%s: guest %s said goodbye: %s",
                                transport.describe(),
                                self.guest,
                                msg.message,
                            )
                            return
                    if len(replies) >= REPLY_BATCH:
                        break
                    frame = transport.receive_frame_nowait()
            finally:
                fair.release(self, served)
            await self._flush(replies)

    async def _flush(self, replies: list[Reply]) -> None:
        """Send the collected replies (in order) through the one send path, and clear them."""
        if not replies:
            return
        if len(replies) == 1:
            reply = replies.pop()
            await self.send(reply)
            return
        async with self._send_lock:
            frames = [frame for reply in replies if (frame := self._encode(reply)) is not None]
            replies.clear()
            if frames:
                await self.transport.send_frames(frames)

    async def _answer_later(self, request: Request) -> None:
        reply = await self.dispatcher.dispatch(request)
        try:
            # send() checks that the connection still carries replies: the guest may
            # have left, or broken the protocol, while this request was served.
            await self.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._drop(reply)  # the connection is ending; the receive loop reports why

    async def _goodbye(self, exc: Exception) -> None:
        with trio.move_on_after(1):
            try:
                await self.send(Goodbye(ErrorCode.PROTOCOL_ERROR, str(exc)[:1000]))
            except (trio.BrokenResourceError, trio.ClosedResourceError, PcisplitError):
                pass  # the peer is being dropped anyway; the protocol error is logged by our caller

    async def _pump_interrupts(self) -> None:
        try:
            await self.outbox.run(self._send_event)
        except EventfdStalledError as exc:
            # The guest made one of its interrupt eventfds block: a logged disconnect.
            # Closing the transport ends the receive loop, and with it the session.
            self._backend_stats.disconnects_for_misbehaviour += 1
            log.warning(
                "%s: guest %s disconnected: %s", self.transport.describe(), self.guest, exc
            )
            await self.transport.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the receive loop sees the same failure and ends the session

    async def _send_event(self, event: Message) -> None:
        self.stats.events_sent += 1
        await self.send(event)

    async def _pump_faults(self) -> None:
        try:
            async for event in self._faults_out:
                self.stats.faults_reported += 1
                await self.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _pump_changes(self) -> None:
        try:
            await self.changes.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the receive loop sees the same failure and ends the session

    async def _close(self, reason: str) -> None:
        self._closed = reason
        self._fair.forget(self)
        self.changes.close()
        if self.stats.replies_dropped or self.stats.events_dropped:
            log.info(
                "guest %s: %d replies and %d events were not sent: the connection had "
                "ended (%s)",
                self.guest,
                self.stats.replies_dropped,
                self.stats.events_dropped,
                reason,
            )
        self.events.close()  # logs what the connection's suppressed runs still owe
        self._calls.fail_all(reason)  # result None: the waiting DMA fails at once
        # Closing the transport wakes any task blocked sending to a guest that stopped
        # reading, so in-flight DMA can finish and the windows can go.
        await self.transport.aclose()
        self.router.release_outbox(self.outbox)
        await self.dma.teardown(self)
        self._faults_in.close()

    # -- DmaCaller: message-based DMA and fault reports ---------------------------------

    def chunk_size(self) -> int:
        return self.conn.max_dma_chunk

    def report_fault(self, event: DmaFaultEvent) -> None:
        try:
            self._faults_in.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.stats.faults_dropped += 1

    async def dma_read_call(self, bus_address: int, length: int, timeout: float) -> bytes:
        result = await self._call(
            lambda cid: DmaReadCall(cid, bus_address, length), bus_address, length, timeout
        )
        if len(result.data) != length:
            raise DmaFaultError(
                f"the frontend answered a {length}-byte DMA read at {bus_address:#x} with "
                f"{len(result.data)} bytes"
            )
        return result.data

    async def dma_write_call(self, bus_address: int, data: bytes, timeout: float) -> None:
        await self._call(
            lambda cid: DmaWriteCall(cid, bus_address, data), bus_address, len(data), timeout
        )

    async def _call(
        self, make: Callable[[int], Message], bus_address: int, length: int, timeout: float
    ) -> DmaCallResult:
        deadline = trio.current_time() + timeout
        calls = self._calls
        with trio.move_on_at(deadline):
            await calls.wait_slot()
        if self._closed is not None:
            raise DmaFaultError(
                f"DMA at {bus_address:#x} abandoned: the guest's connection ended ({self._closed})"
            )
        cid = self.conn.next_call_id()
        call = calls.open(cid)
        self.stats.dma_calls += 1
        try:
            # The send itself is not under the time-out: cancelling a half-sent frame
            # would corrupt the stream. A guest that stops reading blocks it until the
            # connection closes, which fails the call.
            try:
                sent = await self.send(make(cid))
            except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError) as exc:
                raise DmaFaultError(
                    f"DMA at {bus_address:#x} abandoned: cannot reach the guest: {exc}"
                ) from exc
            if not sent:
                raise DmaFaultError(
                    f"DMA at {bus_address:#x} abandoned: the guest's connection no longer "
                    "carries DMA calls"
                )
            with trio.move_on_at(deadline) as scope:
                await calls.wait(call)
        finally:
            calls.close(call)
        if scope.cancelled_caught:
            self.stats.dma_call_timeouts += 1
            raise DmaTimeoutError(
                f"the frontend did not answer a {length}-byte DMA call at {bus_address:#x} "
                f"within {timeout:g} s; transfer abandoned"
            )
        result = call.result
        if result is None:
            raise DmaFaultError(
                f"DMA at {bus_address:#x} abandoned: the guest's connection ended ({self._closed})"
            )
        if result.code is not ErrorCode.OK:
            raise DmaFaultError(
                f"the frontend refused the DMA of {length} bytes at {bus_address:#x}: "
                f"{result.code.name}"
            )
        return result

    def _resolve(self, result: DmaCallResult) -> None:
        if self._calls.resolve(result.call_id, result) is None:
            # The call timed out before the answer came: the Connection accepted it as
            # outstanding, so it is legal, just too late to matter.
            self.stats.late_call_results += 1
