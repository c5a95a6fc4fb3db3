"""The trio guest API: ``async with pcifront.connect(address, guest=...) as bus``.

:class:`Bus` and :class:`Device` are what the guest calls; the bytes are
moved by the bus's :class:`~pcifront.client.pump.Pump` (one reader task per
connection, and callers that read for themselves), and what each frame means
is decided by the connection's sans-I/O core
(:class:`~pcifront.core.session.ClientCore`). Many requests may be in flight;
replies can arrive in any order. The connection is an async context manager
that owns its tasks; a failure in the background surfaces as one
:class:`ConnectionLostError` in the requests that were waiting, never as a
bare exception group.

What the backend sends on its own goes where the bus says: interrupt events
to the device's active ``interrupts()`` block (:mod:`pcifront.client.interrupts`),
DMA calls are answered inline from the guest's buffers (:mod:`pcifront.client.dma`),
DMA faults land on :attr:`Bus.dma_faults`, and hot-plug events update
``bus.devices`` and are acknowledged (:mod:`pcifront.client.changes`). None of that
ever blocks the reader on a consumer, so replies keep flowing. With
``reconnect=True`` the bus survives its connection (:mod:`pcifront.client.reconnect`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from pcifront.client.changes import ChangeTracker, DeviceChanges
from pcifront.client.dma import DmaBuffer, map_buffer
from pcifront.client.interrupts import Interrupts, open_interrupts
from pcifront.client.pump import Pump
from pcifront.client.reconnect import Reconnector, ReconnectPolicy, dial_with_backoff
from pcifront.client.resources import DecodedResources, Resource, decode_device, route
from pcifront.core.dma import DmaSpace
from pcifront.core.errors import ConnectionLostError, error_for_code, removed_error
from pcifront.core.routes import BusStatistics
from pcifront.core.session import (
    ClientCore,
    ConnectionEnded,
    handshake_closed,
    handshake_timed_out,
)
from pcifront.core.views import BusView, DeviceView
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import (
    HOTPLUG_FEATURE,
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    DeviceInfo,
    DmaFaultEvent,
    Event,
    Limits,
    PingRequest,
    Reply,
    Request,
    ResetRequest,
    SnapshotReply,
    SnapshotRequest,
    ValueReply,
)
from shared.transport import (
    FrameTransport,
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

    def _retire(self, reason: str) -> None:
        """The device left the bus: its requests fail from now on, its interrupts() ends."""
        self._removed = reason or "hot-unplugged"
        irqs = self._bus._link.active.get(self._packed)
        if isinstance(irqs, Interrupts) and irqs.device is self:
            irqs._close()

    def _check_present(self) -> None:
        if self._removed is not None:
            raise removed_error(self.address, self._removed)

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
            raise removed_error(self.address, self._removed)
        bus = self._bus
        if bus._reconnect is None:
            return bus._pump.call(make)
        return bus._reconnect.call(make, idempotent=idempotent, check=self._check_present)

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


class Bus(BusView["Device"]):
    """A connected guest's virtual PCI bus."""

    def __init__(
        self,
        transport: FrameTransport,
        core: ClientCore,
        *,
        timeout: float | None,
        polling: bool = False,
    ) -> None:
        self._events_send, self.events = trio.open_memory_channel[Event](256)
        self._faults_send, self.dma_faults = trio.open_memory_channel[DmaFaultEvent](
            DMA_FAULT_BUFFER
        )
        self.devices: list[Device] = []
        self.stats = BusStatistics()
        self._dma = DmaSpace()
        self._changes: ChangeTracker[Device] = ChangeTracker(
            self, lambda info: Device(self, info), retire=Device._retire, renew=Device._update
        )
        self._pump = Pump(
            transport, core, timeout=timeout, polling=polling, stats=self.stats, dma=self._dma,
            event=self._keep_event, fault=self._keep_fault, apply_change=self._changes.apply_event,
        )
        #: What interrupts() blocks and DMA buffers use of this bus (and its interrupt routes).
        self._link = self._pump.link
        #: Set by ``connect(..., reconnect=True)``.
        self._reconnect: Reconnector | None = None

    def _current_core(self) -> ClientCore:
        return self._pump.core

    @property
    def transport(self) -> FrameTransport:
        return self._pump.transport

    @property
    def _lost(self) -> str | None:
        return self._pump.lost

    def statistics(self) -> BusStatistics:
        stats = super().statistics()
        if self._reconnect is not None:
            stats.reconnects = self._reconnect.reconnects
        return stats

    # -- device changes (hot-plug, re-enumeration) ---------------------------------------

    def changes(self) -> DeviceChanges[Device]:
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

    # -- where the core delivers what only the bus keeps --------------------------------

    def _keep_fault(self, event: DmaFaultEvent) -> None:
        try:
            self._faults_send.send_nowait(event)
        except trio.WouldBlock:
            self.stats.dma_faults_unread += 1

    def _keep_event(self, event: Event) -> None:
        try:
            self._events_send.send_nowait(event)
        except trio.WouldBlock:
            raise ConnectionEnded(
                "events arrived faster than the guest consumed them (256 buffered)"
            ) from None

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
                reply = await self._pump.call(make)
            else:
                reply = await self._reconnect.call(make, idempotent=True)
            assert isinstance(reply, SnapshotReply)
            self._changes.rebase(reply.devices, reason=reason)
        finally:
            self._changes.end_refresh()

    async def _route(self, address: int, size: int, *, io: bool) -> tuple[Device, Resource]:
        return await route(self.devices, Device._decoded_resources, self.guest, address, size,
                           io=io)

    async def mmio_read(self, address: int, size: int) -> int:
        """Read 1, 2, 4 or 8 bytes at a guest-physical memory address.

        Routed, as a root complex would, to the BAR that decodes it now (the
        address firmware assigned, or whatever the guest programmed since),
        provided the device has memory decode on. Raises
        :class:`~pcifront.UnclaimedAddressError` when nothing decodes it.
        """
        device, bar = await self._route(address, size, io=False)
        return await device.bar_read(bar.index, address - bar.start, size)

    async def mmio_write(self, address: int, size: int, value: int) -> None:
        """Write 1, 2, 4 or 8 bytes at a guest-physical memory address (see :meth:`mmio_read`)."""
        device, bar = await self._route(address, size, io=False)
        await device.bar_write(bar.index, address - bar.start, size, value)

    async def io_read(self, port: int, size: int) -> int:
        """Read 1, 2 or 4 bytes at an I/O port, routed to the I/O BAR that decodes it."""
        device, bar = await self._route(port, size, io=True)
        return await device.bar_read(bar.index, port - bar.start, size)

    async def io_write(self, port: int, size: int, value: int) -> None:
        """Write 1, 2 or 4 bytes at an I/O port, routed to the I/O BAR that decodes it."""
        device, bar = await self._route(port, size, io=True)
        await device.bar_write(bar.index, port - bar.start, size, value)

    async def wait_closed(self) -> str:
        """Wait until the connection ends (backend gone, Goodbye, or closed); returns why."""
        return await self._pump.wait_lost()

    async def ping(self) -> None:
        """One protocol round trip that touches no device."""
        if self._reconnect is None:
            await self._pump.call(PingRequest)
        else:
            await self._reconnect.call(PingRequest, idempotent=True)


    async def aclose(self) -> None:
        """Say goodbye and close the transport. Idempotent."""
        self._changes.end("the guest closed the bus", lost=False)
        if self._reconnect is not None:
            self._reconnect.closing = True
        await self._pump.close()
        self._faults_send.close()


async def _handshake(
    transport: FrameTransport, core: ClientCore, timeout: float | None, token: bytes, *, tls: bool
) -> None:
    try:
        await transport.send_frame(core.hello(token))
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            frame = await transport.receive_frame()
    except (trio.EndOfChannel, trio.BrokenResourceError) as exc:
        raise handshake_closed(exc.__cause__ or exc.__context__, tls=tls) from exc
    except trio.TooSlowError as exc:
        raise handshake_timed_out(timeout) from exc
    transport.set_max_frame_size(core.welcome(frame))
    await transport.start_session(is_server=False, max_frame_size=transport.max_frame_size)


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

    async def dial() -> tuple[FrameTransport, ClientCore]:
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                transport = await open_transport(address, opts)
        except trio.TooSlowError:
            raise TransportConnectError(
                f"cannot connect to {address}: no answer within {timeout} s; is the address "
                "right and the backend running?"
            ) from None
        try:
            core = ClientCore(guest, limits=limits, features=FRONTEND_FEATURES)
            await _handshake(
                transport, core, timeout, secret.strip(), tls=address.startswith("tls:")
            )
            return transport, core
        except BaseException:
            with trio.CancelScope(shield=True):
                await transport.aclose()
            raise

    policy = ReconnectPolicy() if reconnect is True else reconnect or None
    if policy is None:
        transport, core = await dial()
    else:
        transport, core, _ = await dial_with_backoff(dial, policy)
    bus = Bus(transport, core, timeout=timeout, polling=bool(opts.poll_us))
    if policy is not None:
        bus._reconnect = Reconnector(
            bus._pump, dial, policy, lambda reason: bus._changes.end(reason, lost=True)
        )

    async def serve(reenumerate: bool) -> None:
        # One connection's tasks; returns when that connection is gone.
        async with trio.open_nursery() as tasks:

            async def receive() -> None:
                try:
                    await bus._pump.receive_loop()
                finally:
                    if bus._reconnect is None:
                        bus._faults_send.close()  # with reconnect: at aclose()
                tasks.cancel_scope.cancel()

            tasks.start_soon(receive)
            tasks.start_soon(bus._pump.watchdog)
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
