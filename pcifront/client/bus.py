"""The guest API: ``async with pcifront.connect(address, guest=...) as bus``.

One background task per connection reads frames and hands each reply to the
request waiting for it (many requests may be in flight; replies can arrive in
any order). The connection is an async context manager that owns that task; a
failure in the background surfaces as one :class:`ConnectionLostError` in the
requests that were waiting, never as a bare exception group.

The same task routes what the backend sends on its own: interrupt events go
to the device's active ``interrupts()`` block (:mod:`pcifront.client.interrupts`),
DMA calls are answered inline from the guest's buffers (:mod:`pcifront.client.dma`),
DMA faults land on :attr:`Bus.dma_faults`, and hot-plug events update
``bus.devices`` and are acknowledged (:mod:`pcifront.client.changes`). None of that
ever blocks the task on a consumer, so replies keep flowing. With
``reconnect=True`` the bus survives its connection (:mod:`pcifront.client.reconnect`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from pcifront.client.changes import ChangeTracker, DeviceChanges, removed_error
from pcifront.client.dma import DmaBuffer, DmaSpace, map_buffer
from pcifront.client.interrupts import Interrupts, open_interrupts
from pcifront.client.reconnect import Reconnector, ReconnectPolicy, dial_with_backoff
from pcifront.client.resources import DecodedResources, Resource, decode_device, route
from pcifront.core.errors import ConnectionLostError, HandshakeError, error_for_code
from pcifront.core.routes import BusLink, BusStatistics, InterruptSink
from pcifront.core.views import BusView, DeviceView
from shared.errors import ErrorCode, LocalProtocolError, PcisplitError, RemoteProtocolError
from shared.pci import PciAddress
from shared.protocol import (
    HOTPLUG_FEATURE,
    TERMINAL_STATES,
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    Connection,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceInfo,
    DeviceRemovedEvent,
    DmaFaultEvent,
    DmaReadCall,
    DmaWriteCall,
    ErrorReply,
    Event,
    Goodbye,
    HandshakeRejected,
    InterruptEvent,
    Limits,
    PingRequest,
    Reply,
    Request,
    ResetRequest,
    Role,
    SnapshotReply,
    SnapshotRequest,
    ValueReply,
)
from shared.sync import Call, CallTable, FastLock
from shared.transport import (
    FrameTransport,
    ReceiveInterrupted,
    TransportConnectError,
    TransportOptions,
    open_transport,
)

__all__ = ["connect", "Bus", "Device", "BusStatistics", "FRONTEND_FEATURES"]

log = logging.getLogger("pcisplit.frontend")

FRONTEND_FEATURES = (
    "bus-snapshot", "config-access", "bar-access", "reset", "ping", "interrupts", "dma",
    HOTPLUG_FEATURE,
)
#: Writes below this offset may change what a device decodes (BARs, ROM, Command).
_HEADER_SIZE = 0x48
#: DMA fault events buffered on ``Bus.dma_faults`` before new ones are only counted.
DMA_FAULT_BUFFER = 64


class Device(DeviceView):
    """One function on the guest's virtual bus."""

    def __init__(self, bus: Bus, info: DeviceInfo) -> None:
        super().__init__(info)
        self._bus = bus
        # What the BARs decode now; dropped by any write to the header (BARs, Command).
        self._decoded: DecodedResources | None = None
        #: Why the device left the bus (hot-unplug, or gone after a reconnect); None while present.
        self._removed: str | None = None

    def _update(self, info: DeviceInfo) -> None:
        """A new snapshot of the same device (after a refresh or a reconnect)."""
        self.info = info
        self._decoded = None

    @property
    def removed(self) -> bool:
        """True once the device has left the bus; its requests then raise DeviceRemovedError."""
        return self._removed is not None

    def _request(
        self, make: Callable[[int], Request], *, idempotent: bool
    ) -> Coroutine[object, None, Reply]:
        # One check per request: a removed Device never reaches whatever took its address.
        # Not itself a coroutine: the hot path pays no extra frame for it.
        if self._removed is not None:
            raise removed_error(self)
        bus = self._bus
        if bus._reconnect is None:
            return bus._call(make)
        return bus._reconnect.call(make, idempotent=idempotent, device=self)

    @property
    def bar_sizes(self) -> tuple[int, ...]:
        """Sizes of BARs 0-5 and the expansion ROM (index 6); 0 where not implemented.

        All zeros when the backend did not report sizes.
        """
        return self.info.bar_sizes or (0,) * 7

    async def resources(self) -> list[Resource]:
        """The BARs and ROM with the addresses the guest sees now (sysfs ``resource``)."""
        return list(await self._decoded_resources())

    async def _decoded_resources(self) -> DecodedResources:
        if self._decoded is None:
            self._decoded = await decode_device(self)
        return self._decoded

    async def config_read(self, offset: int, size: int) -> int:
        """Read 1, 2 or 4 bytes of config space."""
        reply = await self._request(
            lambda rid: ConfigReadRequest(rid, self._packed, offset, size), idempotent=True
        )
        assert isinstance(reply, ValueReply)
        return reply.value

    async def config_write(self, offset: int, size: int, value: int) -> None:
        """Write 1, 2 or 4 bytes of config space (the backend's policy may refuse)."""
        if offset < _HEADER_SIZE:
            self._decoded = None
        await self._request(
            lambda rid: ConfigWriteRequest(rid, self._packed, offset, size, value),
            idempotent=False,
        )

    async def bar_read(self, bar: int, offset: int, size: int) -> int:
        """Read 1, 2, 4 or 8 bytes from BAR ``bar``."""
        reply = await self._request(
            lambda rid: BarReadRequest(rid, self._packed, bar, offset, size), idempotent=True
        )
        assert isinstance(reply, ValueReply)
        return reply.value

    async def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """Write 1, 2, 4 or 8 bytes to BAR ``bar``."""
        await self._request(
            lambda rid: BarWriteRequest(rid, self._packed, bar, offset, size, value),
            idempotent=False,
        )

    async def reset(self) -> None:
        """Reset the device to its power-on state (with the addresses firmware assigned)."""
        self._decoded = None
        await self._request(lambda rid: ResetRequest(rid, self._packed), idempotent=False)

    def interrupts(
        self, mode: str = "msi", vectors: int = 1
    ) -> AbstractAsyncContextManager[Interrupts]:
        """Enable ``mode`` (``"intx"``, ``"msi"``, ``"msix"``) with ``vectors`` vectors.

        ``async with dev.interrupts(mode="msi") as irqs:`` enables on entry and
        disables on exit, also when the block fails or is cancelled. Inside,
        ``await irqs.receive()`` returns the next :class:`~pcifront.Interrupt`
        and ``await irqs.eoi(irq)`` ends it (INTx: unmasks the line).
        """
        return open_interrupts(self._bus._link, self, self._packed, self.address, mode, vectors)


#: Owner of the right to read the transport when no caller holds it: the reader task.
_READER = object()


class Bus(BusView["Device"]):
    """A connected guest's virtual PCI bus."""

    def __init__(
        self, transport: FrameTransport, conn: Connection, *, timeout: float | None
    ) -> None:
        self._transport = transport
        self._conn = conn
        self._timeout = timeout
        self._max_in_flight = conn.peer_limits.max_in_flight
        self._calls: CallTable[Reply] = CallTable(self._full)
        self._send_lock = FastLock()
        # Who reads the transport: the reader task (_READER), a caller (its Call) or
        # nobody yet (None). See _await_reply for why callers read for themselves.
        self._owner: object = None
        self._read_scope: trio.CancelScope | None = None
        self._caller_reading = False  # a caller blocked in an interruptible receive
        # True while the reader task is reading or routing (not merely woken up).
        self._reader_busy = False
        # True from waking the reader task until it runs (then it is runnable).
        self._reader_woken = False
        #: Set by connect() when the transport polls (shm: with poll_us > 0).
        self._polling = False
        self._want: deque[Call[Reply]] = deque()
        self._reader_idle = trio.lowlevel.ParkingLot()
        self._lost_event = trio.Event()
        self._events_send, self.events = trio.open_memory_channel[Event](256)
        self._faults_send, self.dma_faults = trio.open_memory_channel[DmaFaultEvent](
            DMA_FAULT_BUFFER
        )
        self.devices: list[Device] = []
        self.stats = BusStatistics()
        self._dma = DmaSpace()
        self._link = BusLink(
            self._call,
            features=conn.features,
            can_pass_fds=transport.can_pass_fds,
            disable_timeout=10.0 if timeout is None else timeout,
            stats=self.stats,
        )
        self._changes = ChangeTracker(self, lambda info: Device(self, info))
        #: Set by ``connect(..., reconnect=True)``.
        self._reconnect: Reconnector | None = None

    @property
    def transport(self) -> FrameTransport:
        return self._transport

    @property
    def _lost(self) -> str | None:
        return self._calls.failed

    @property
    def _active_irqs(self) -> dict[int, InterruptSink]:
        """Active interrupts blocks by packed address (read-only view for .changes)."""
        return self._link.active

    def statistics(self) -> BusStatistics:
        stats = super().statistics()
        if self._reconnect is not None:
            stats.reconnects = self._reconnect.reconnects
        return stats

    # -- device changes (hot-plug, re-enumeration) ---------------------------------------

    def changes(self) -> DeviceChanges:
        """``async for change in bus.changes()``: each device added or removed from now on.

        Each :class:`~pcifront.DeviceChange` says ``kind`` (``ChangeKind.ADDED``
        or ``REMOVED``), the :class:`Device` and, for a removal, why.
        ``bus.devices`` is already updated when a change is yielded.
        """
        return self._changes.subscribe()

    async def wait_changed(self) -> None:
        """Wait until ``bus.devices`` changes (a device was added or removed)."""
        await self._changes.wait_changed()

    @property
    def connected(self) -> bool:
        """False while the connection is lost (a ``reconnect=True`` bus is reconnecting)."""
        return self._lost is None

    async def dma_map(self, size: int, *, writable: bool = True) -> DmaBuffer:
        """Map ``size`` bytes of guest memory for device DMA; returns the :class:`DmaBuffer`.

        Its ``bus_address`` is what a device's DMA registers take. On ``unix:``
        and ``shm:`` the memory is shared with the backend (zero copy);
        elsewhere the backend reaches it through DMA call messages. Use
        ``async with await bus.dma_map(n) as buf:`` or ``await buf.unmap()``.
        """
        if "dma" not in self.features:
            raise error_for_code(
                ErrorCode.NOT_IMPLEMENTED,
                "the backend did not offer the 'dma' feature; upgrade pciback",
            )
        return await map_buffer(self._link, self._dma, size, writable=writable)

    def _on_fault(self, event: DmaFaultEvent) -> None:
        self.stats.dma_faults += 1
        log.warning(
            "device %s DMA fault: %s %d bytes at %#x: %s",
            PciAddress.unpack(event.device), "write" if event.is_write else "read",
            event.length, event.bus_address, event.message,
        )
        try:
            self._faults_send.send_nowait(event)
        except trio.WouldBlock:
            self.stats.dma_faults_unread += 1

    async def refresh(self, *, include_config: bool = False) -> list[Device]:
        """Take a bus snapshot and bring :attr:`devices` up to date.

        Devices that did not change keep their :class:`Device` objects; any
        difference is reported through :meth:`changes` and :meth:`wait_changed`.
        """
        await self._enumerate(include_config, reason="", raw=False)
        return self.devices

    async def _enumerate(self, include_config: bool, *, reason: str, raw: bool) -> None:
        """Snapshot and rebase. ``raw``: on this connection only (the reconnector's own use)."""
        make = lambda rid: SnapshotRequest(rid, include_config)  # noqa: E731
        self._changes.begin_refresh()
        try:
            if raw or self._reconnect is None:
                reply = await self._call(make)
            else:
                reply = await self._reconnect.call(make, idempotent=True, device=None)
            assert isinstance(reply, SnapshotReply)
            self._changes.rebase(reply.devices, reason=reason)
        finally:
            self._changes.end_refresh()

    async def mmio_read(self, address: int, size: int) -> int:
        """Read 1, 2, 4 or 8 bytes at a guest-physical memory address.

        Routed, as a root complex would, to the BAR that decodes it now (the
        address firmware assigned, or whatever the guest programmed since),
        provided the device has memory decode on. Raises
        :class:`~pcifront.UnclaimedAddressError` when nothing decodes it.
        """
        device, bar = await route(self, address, size, io=False)
        return await device.bar_read(bar.index, address - bar.start, size)

    async def mmio_write(self, address: int, size: int, value: int) -> None:
        """Write 1, 2, 4 or 8 bytes at a guest-physical memory address (see :meth:`mmio_read`)."""
        device, bar = await route(self, address, size, io=False)
        await device.bar_write(bar.index, address - bar.start, size, value)

    async def io_read(self, port: int, size: int) -> int:
        """Read 1, 2 or 4 bytes at an I/O port, routed to the I/O BAR that decodes it."""
        device, bar = await route(self, port, size, io=True)
        return await device.bar_read(bar.index, port - bar.start, size)

    async def io_write(self, port: int, size: int, value: int) -> None:
        """Write 1, 2 or 4 bytes at an I/O port, routed to the I/O BAR that decodes it."""
        device, bar = await route(self, port, size, io=True)
        await device.bar_write(bar.index, port - bar.start, size, value)

    async def wait_closed(self) -> str:
        """Wait until the connection ends (backend gone, Goodbye, or closed); returns why."""
        await self._lost_event.wait()
        return self._lost or "connection closed"

    async def ping(self) -> None:
        """One protocol round trip that touches no device."""
        if self._reconnect is None:
            await self._call(PingRequest)
        else:
            await self._reconnect.call(PingRequest, idempotent=True, device=None)

    # -- requests -------------------------------------------------------------------------

    def _full(self) -> bool:
        # The Connection counts a request until its reply comes, also after its caller
        # gave up, so the backend's in-flight limit is never exceeded.
        return self._conn.requests_in_flight >= self._max_in_flight

    async def _call(
        self, make: Callable[[int], Request], *, fds: list[int] | None = None
    ) -> Reply:
        calls = self._calls
        if calls.failed is not None:
            raise ConnectionLostError(calls.failed, request_sent=False)
        # Parking only when full keeps the common path free of scheduler passes (and,
        # tested here first, of a coroutine call).
        if self._full():
            await calls.wait_slot()
            if calls.failed is not None:
                raise ConnectionLostError(calls.failed, request_sent=False)
        conn = self._conn
        rid = conn.next_request_id()
        try:
            request = make(rid)
        except LocalProtocolError as exc:
            # A bad argument (offset 0x1000, size 3, ...): the message cannot even be
            # built, so nothing is sent. The protocol's own checks are the one rule.
            raise error_for_code(exc.code, str(exc)) from exc
        frame = conn.send(request)
        call = calls.open(rid, trio.current_time())
        stats = self.stats
        stats.requests_sent += 1
        if len(calls) > stats.max_in_flight_seen:
            stats.max_in_flight_seen = len(calls)
        try:
            await self._send(frame, fds)
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

    async def _await_reply(self, call: Call[Reply]) -> None:
        """Wait for ``call``'s reply, reading the transport ourselves when we can.

        A reader task that hands each reply to the waiting caller puts an extra
        pass through the scheduler on the critical path of every request. So a
        caller reads the transport itself whenever nobody else is reading (and
        routes whatever else arrives: other callers' replies, events, DMA calls);
        when it has its reply it passes the transport to the next caller that
        wants it, else back to the reader task, which keeps events flowing while no
        request is outstanding. A caller that finds the transport being read waits
        to be handed its reply (or the transport); it never interrupts a reader.
        """
        calls = self._calls
        try:
            while call.result is None and calls.failed is None:
                owner = self._owner
                if (
                    owner is None
                    or owner is call
                    or (owner is _READER and not self._reader_busy)
                ):
                    # Free, handed to us, or the reader task was woken but has not
                    # started reading yet: read for ourselves (it parks again).
                    self._owner = call
                    await self._read_until(call)
                    continue
                self._want.append(call)
                try:
                    await calls.wait(call)
                finally:
                    if call in self._want:
                        self._want.remove(call)
        finally:
            if self._owner is call:
                self._release()

    def _pass_to_wanter(self) -> bool:
        """Hand the transport to the first caller still waiting to read it."""
        want = self._want
        while want:
            call = want.popleft()
            if call.waiting and call.result is None:
                self._owner = call
                self._calls.wake(call)
                return True
        return False

    def _release(self) -> None:
        """The current reader stops: the next waiting caller reads, else the reader task."""
        if not self._pass_to_wanter():
            self._owner = _READER
            if self._reader_idle.unpark():
                self._reader_woken = True

    async def _read_until(self, call: Call[Reply]) -> None:
        """As the transport's reader: route frames until ``call`` has its reply."""
        transport = self._transport
        if self._polling and self._reader_woken:
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
        """A caller's own read, which the watchdog and _fail_all stop with
        ``interrupt_receive()`` (None then): no cancel scope per read, which costs
        about as much as a scheduler pass."""
        self._caller_reading = True
        try:
            return await self._transport.receive_frame()
        except ReceiveInterrupted:
            return None
        finally:
            self._caller_reading = False

    async def _receive_in_scope(self) -> bytes | None:
        """A caller's own read on a transport that cannot be interrupted: under a cancel
        scope the watchdog and _fail_all cancel (None then)."""
        with trio.CancelScope() as scope:
            self._read_scope = scope
            try:
                return await self._transport.receive_frame()
            finally:
                self._read_scope = None
        return None

    async def _watchdog(self) -> None:
        """Fail requests that waited longer than the timeout.

        One task checking a few times per timeout period is far cheaper than a
        cancel scope around every request on the hot path.
        """
        timeout = self._timeout
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
                    if self._owner is call:
                        self._stop_caller_read()  # it was reading for itself: stop

    async def _send(self, frame: bytes, fds: list[int] | None = None) -> None:
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
            self._fail_all(f"connection to the backend lost while sending: {exc}")
            raise ConnectionLostError(self._lost or str(exc), request_sent=True) from exc
        finally:
            lock.release()

    def _stop_caller_read(self) -> None:
        """Stop a caller blocked reading the transport for itself (it re-checks why)."""
        if self._caller_reading:
            self._transport.interrupt_receive()
        elif self._read_scope is not None:
            self._read_scope.cancel()

    def _fail_all(self, reason: str) -> None:
        self._calls.fail_all(reason)
        if self._owner is not _READER:
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

    # -- receiving ------------------------------------------------------------------------

    async def _on_frames(self, frame: bytes) -> int:
        """Route ``frame`` and every frame already buffered after it (no pass each).

        Returns how many replies were handed to their callers.
        """
        transport = self._transport
        before = self.stats.replies_received
        try:
            next_frame: bytes | None = frame
            while next_frame is not None:
                if not await self._route(next_frame):
                    break
                next_frame = transport.receive_frame_nowait()
        except trio.WouldBlock:
            self._fail_all("events arrived faster than the guest consumed them (256 buffered)")
        except RemoteProtocolError as exc:
            self._fail_all(f"the backend violated the protocol: {exc}")
            log.error("backend protocol violation: %s", exc)
        except ConnectionLostError:
            pass  # answering a DMA call found the connection gone; _send recorded why
        return self.stats.replies_received - before

    async def _route(self, frame: bytes) -> bool:
        """Apply one frame. False when the backend said goodbye (or we did)."""
        if self._conn.state in TERMINAL_STATES:
            # We said Goodbye while replies were on their way: nothing more is read.
            return False
        msg = self._conn.receive(frame)
        stats = self.stats
        if isinstance(msg, Reply):
            stats.replies_received += 1
            if self._calls.resolve(msg.request_id, msg) is None:
                stats.late_replies += 1
                log.debug("reply to request %d arrived after it was cancelled", msg.request_id)
        elif isinstance(msg, Event):
            stats.events_received += 1
            if isinstance(msg, InterruptEvent):
                self._link.route_interrupt(msg.device, msg.vector, msg.count)
            elif isinstance(msg, (DmaReadCall, DmaWriteCall)):
                # A memory copy: answered inline, in order, via the one send path.
                await self._send(self._conn.send(self._dma.answer(msg)))
            elif isinstance(msg, DmaFaultEvent):
                self._on_fault(msg)
            elif isinstance(msg, (DeviceAddedEvent, DeviceRemovedEvent)):
                # Applied at once (never blocks), then acknowledged in order.
                stats.hotplug_events += 1
                self._changes.apply_event(msg)
                await self._send(self._conn.send(DeviceChangeAck(msg.change_id)))
            else:
                self._events_send.send_nowait(msg)
        elif isinstance(msg, Goodbye):
            self._fail_all(f"backend closed the connection ({msg.code.name}): {msg.message}")
            return False
        return True

    def _receive_failed(self, exc: BaseException) -> None:
        if isinstance(exc, trio.EndOfChannel):
            self._fail_all("the backend closed the connection")
        else:
            self._fail_all(f"connection to the backend broke: {exc}")

    async def _receive_loop(self) -> None:
        """The reader task: reads while no caller does (events flow between requests)."""
        transport = self._transport
        try:
            while self._calls.failed is None:
                self._reader_woken = False
                owner = self._owner
                if owner is not None and owner is not _READER:
                    await self._reader_idle.park()
                    continue
                if self._pass_to_wanter():
                    continue
                self._owner = _READER
                self._reader_busy = True
                try:
                    delivered = await self._on_frames(await transport.receive_frame())
                finally:
                    self._reader_busy = False
                if delivered:
                    # The callers just handed their replies run in this pass; one that
                    # sends again finds the transport free and reads for itself.
                    await trio.lowlevel.cancel_shielded_checkpoint()
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._receive_failed(exc)
        finally:
            if self._reconnect is None:
                self._faults_send.close()  # with reconnect: at aclose()

    # -- reconnecting (pcifront.client.reconnect drives these) ---------------------------------

    async def _detach_connection(self) -> None:
        """The connection is gone: close it, end what lived in its backend session."""
        with trio.CancelScope(shield=True):
            await self._transport.aclose()
        self._link.close_all_interrupts(self._lost or "the connection ended")
        self._dma.release_all(self._lost or "the connection ended")
        # Requests woken by _fail_all leave the call table as they run; the next
        # connection numbers its requests from 1 again, so wait for them to go.
        for _ in range(1000):
            if not len(self._calls):
                break
            await trio.lowlevel.checkpoint()
        else:
            log.warning(
                "%d requests did not leave after the connection was lost", len(self._calls)
            )

    def _attach_connection(self, transport: FrameTransport, conn: Connection) -> None:
        self._transport = transport
        self._conn = conn
        self._max_in_flight = conn.peer_limits.max_in_flight
        self._calls = CallTable(self._full)  # a fresh table: not failed, no calls
        self._owner, self._read_scope, self._reader_busy = None, None, False
        self._caller_reading = False
        self._want.clear()
        self._link.rebind(features=conn.features, can_pass_fds=transport.can_pass_fds)

    async def aclose(self) -> None:
        """Say goodbye and close the transport. Idempotent."""
        self._changes.end("the guest closed the bus", lost=False)
        if self._reconnect is not None:
            self._reconnect.closing = True
        if self._lost is None:
            with trio.move_on_after(1):
                try:
                    await self._send(self._conn.close(ErrorCode.OK, "guest closing"))
                except (ConnectionLostError, PcisplitError):
                    pass  # already gone: nothing to say goodbye to
        self._fail_all("the connection was closed by the guest")
        await self._transport.aclose()
        self._dma.release_all("the guest closed the bus")
        self._faults_send.close()


async def _handshake(
    transport: FrameTransport,
    guest: str,
    limits: Limits,
    timeout: float | None,
    token: bytes,
    *,
    tls: bool,
) -> Connection:
    conn = Connection(Role.CLIENT, limits=limits, features=FRONTEND_FEATURES, guest=guest)
    try:
        await transport.send_frame(conn.hello(token))
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            frame = await transport.receive_frame()
    except (trio.EndOfChannel, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f" ({cause})" if cause is not None else ""
        hint = (
            "; over tls:// this usually means it refused our client certificate (pass "
            "--cert/--key naming the guest)"
            if tls
            else "; is the address a pcisplit backend?"
        )
        raise ConnectionLostError(
            f"the backend closed the connection during the handshake{detail}{hint}"
        ) from exc
    except trio.TooSlowError as exc:
        raise ConnectionLostError(
            f"the backend did not answer the handshake within {timeout} s"
        ) from exc
    reply = conn.receive(frame)
    if isinstance(reply, HandshakeRejected):
        raise HandshakeError(reply.code, reply.message)
    transport.set_max_frame_size(conn.frame_size)
    await transport.start_session(is_server=False, max_frame_size=transport.max_frame_size)
    return conn


@asynccontextmanager
async def connect(
    address: str,
    guest: str = "guest0",
    *,
    options: TransportOptions | None = None,
    limits: Limits | None = None,
    timeout: float | None = 60.0,
    include_config: bool = False,
    poll_us: float | None = None,
    token: bytes | str | None = None,
    reconnect: bool | ReconnectPolicy = False,
) -> AsyncIterator[Bus]:
    """Connect to a backend, act as ``guest``, and yield its :class:`Bus`.

    ``address`` is a transport address (``unix:/path``, ``shm:/path``,
    ``tcp://host:port``, ``tls://host:port``, ``vsock://cid:port``, ``memory:name``).
    ``timeout`` bounds the handshake and each request (None: wait forever).
    ``include_config`` fetches every device's config image in the first snapshot.
    ``poll_us`` (``shm:``): after each message, spin on the ring for up to that
    many microseconds before sleeping on the doorbell; the spin runs in C with the
    GIL released, and never while another task of this process is runnable. It
    pays only on dedicated cores (see docs/performance.md).
    ``token`` is the guest's secret (the contents of its ``token_file``) for
    ``tcp://`` and ``vsock://`` backends; other transports prove the guest's
    identity themselves and need none.
    ``reconnect=True`` (or a :class:`~pcifront.ReconnectPolicy`) keeps the bus
    alive across lost connections: the first connection and every reconnect
    retry with exponential back-off, reads are retried, and a write whose
    outcome is unknown raises :class:`~pcifront.OutcomeUnknownError`.
    """
    secret = token.encode() if isinstance(token, str) else (token or b"")
    limits = limits or Limits()
    opts = options or TransportOptions()
    opts.max_frame_size = limits.max_message_size
    if poll_us is not None:
        opts.poll_us = poll_us

    async def dial() -> tuple[FrameTransport, Connection]:
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                transport = await open_transport(address, opts)
        except trio.TooSlowError:
            raise TransportConnectError(
                f"cannot connect to {address}: no answer within {timeout} s; is the address "
                "right and the backend running?"
            ) from None
        try:
            conn = await _handshake(
                transport, guest, limits, timeout, secret.strip(), tls=address.startswith("tls:")
            )
            return transport, conn
        except BaseException:
            with trio.CancelScope(shield=True):
                await transport.aclose()
            raise

    policy = ReconnectPolicy() if reconnect is True else reconnect or None
    if policy is None:
        transport, conn = await dial()
    else:
        transport, conn, _ = await dial_with_backoff(dial, policy)
    bus = Bus(transport, conn, timeout=timeout)
    bus._polling = bool(opts.poll_us)
    if policy is not None:
        bus._reconnect = Reconnector(bus, dial, policy)

    async def serve(reenumerate: bool) -> None:
        # One connection's tasks; returns when that connection is gone.
        async with trio.open_nursery() as tasks:

            async def receive() -> None:
                await bus._receive_loop()
                tasks.cancel_scope.cancel()

            tasks.start_soon(receive)
            tasks.start_soon(bus._watchdog)
            if reenumerate and bus._reconnect is not None:
                try:
                    await bus._enumerate(
                        include_config, reason="re-enumerated after reconnecting", raw=True
                    )
                except ConnectionLostError:
                    return  # lost again at once: the receive loop ends and we retry
                except PcisplitError as exc:
                    log.warning("re-enumerating after the reconnect failed: %s", exc)
                bus._reconnect.mark_up()

    try:
        async with trio.open_nursery() as nursery:
            if bus._reconnect is None:

                async def serve_once() -> None:
                    await serve(False)
                    bus._changes.end(bus._lost or "the connection ended", lost=True)

                nursery.start_soon(serve_once)
            else:
                nursery.start_soon(bus._reconnect.run, serve)
            try:
                await bus.refresh(include_config=include_config)
                yield bus
            finally:
                with trio.CancelScope(shield=True):
                    await bus.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The receive loop never raises, so a group holds only the body's own exception.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
