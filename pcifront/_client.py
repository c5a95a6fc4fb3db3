"""The guest API: ``async with pcifront.connect(address, guest=...) as bus``.

One background task per connection reads frames and hands each reply to the
request waiting for it (many requests may be in flight; replies can arrive in
any order). The connection is an async context manager that owns that task; a
failure in the background surfaces as one :class:`ConnectionLostError` in the
requests that were waiting, never as a bare exception group.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from pcifront._errors import ConnectionLostError, HandshakeError, error_for_code
from shared.errors import ErrorCode, PcisplitError, RemoteProtocolError
from shared.pci import PciAddress
from shared.protocol import (
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    Connection,
    DeviceInfo,
    ErrorReply,
    Event,
    Goodbye,
    HandshakeRejected,
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
from shared.transport import FrameTransport, TransportOptions, open_transport

__all__ = ["connect", "Bus", "Device", "BusStatistics", "FRONTEND_FEATURES"]

log = logging.getLogger("pcisplit.frontend")

FRONTEND_FEATURES = ("bus-snapshot", "config-access", "bar-access", "reset", "ping")


class _Pending:
    __slots__ = ("event", "reply", "started")

    def __init__(self, started: float) -> None:
        self.event = trio.Event()
        self.reply: Reply | None = None
        self.started = started


@dataclass
class BusStatistics:
    requests_sent: int = 0
    replies_received: int = 0
    errors_received: int = 0
    events_received: int = 0
    max_in_flight_seen: int = 0


class Device:
    """One function on the guest's virtual bus."""

    def __init__(self, bus: Bus, info: DeviceInfo) -> None:
        self._bus = bus
        self._packed = info.address
        self.pci_address = PciAddress.unpack(info.address)
        self.info = info

    @property
    def address(self) -> str:
        """``DDDD:BB:DD.F`` on the virtual bus, e.g. ``0000:00:00.0``."""
        return str(self.pci_address)

    @property
    def vendor_id(self) -> int:
        return self.info.vendor_id

    @property
    def device_id(self) -> int:
        return self.info.device_id

    @property
    def class_code(self) -> int:
        """24 bits: base class, subclass, programming interface."""
        return self.info.class_code

    @property
    def revision(self) -> int:
        return self.info.revision

    @property
    def config(self) -> bytes | None:
        """The config image from the last snapshot taken with ``include_config``."""
        return self.info.config

    async def config_read(self, offset: int, size: int) -> int:
        """Read 1, 2 or 4 bytes of config space."""
        reply = await self._bus._call(
            lambda rid: ConfigReadRequest(rid, self._packed, offset, size)
        )
        assert isinstance(reply, ValueReply)
        return reply.value

    async def config_write(self, offset: int, size: int, value: int) -> None:
        """Write 1, 2 or 4 bytes of config space (the backend's policy may refuse)."""
        await self._bus._call(
            lambda rid: ConfigWriteRequest(rid, self._packed, offset, size, value)
        )

    async def bar_read(self, bar: int, offset: int, size: int) -> int:
        """Read 1, 2, 4 or 8 bytes from BAR ``bar``."""
        reply = await self._bus._call(
            lambda rid: BarReadRequest(rid, self._packed, bar, offset, size)
        )
        assert isinstance(reply, ValueReply)
        return reply.value

    async def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """Write 1, 2, 4 or 8 bytes to BAR ``bar``."""
        await self._bus._call(
            lambda rid: BarWriteRequest(rid, self._packed, bar, offset, size, value)
        )

    async def reset(self) -> None:
        """Reset the device to its power-on state."""
        await self._bus._call(lambda rid: ResetRequest(rid, self._packed))

    def __repr__(self) -> str:
        return (
            f"<Device {self.address} {self.vendor_id:04x}:{self.device_id:04x} "
            f"class {self.class_code:06x}>"
        )


class Bus:
    """A connected guest's virtual PCI bus."""

    def __init__(
        self, transport: FrameTransport, conn: Connection, *, timeout: float | None
    ) -> None:
        self._transport = transport
        self._conn = conn
        self._timeout = timeout
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._max_in_flight = conn.peer_limits.max_in_flight
        self._slot_free = trio.lowlevel.ParkingLot()
        self._lost: str | None = None
        self._events_send, self.events = trio.open_memory_channel[Event](256)
        self.devices: list[Device] = []
        self.stats = BusStatistics()

    @property
    def guest(self) -> str:
        assert self._conn.guest is not None
        return self._conn.guest

    @property
    def transport(self) -> FrameTransport:
        return self._transport

    def statistics(self) -> BusStatistics:
        return self.stats

    def device(self, address: str | PciAddress) -> Device:
        """The device at ``address`` (``0000:00:01.0`` or ``00:01.0``)."""
        wanted = address if isinstance(address, PciAddress) else PciAddress.parse(address)
        for dev in self.devices:
            if dev.pci_address == wanted:
                return dev
        raise error_for_code(ErrorCode.NOT_FOUND, f"no device at {wanted} on this bus")

    async def refresh(self, *, include_config: bool = False) -> list[Device]:
        """Take a bus snapshot and rebuild :attr:`devices`."""
        reply = await self._call(lambda rid: SnapshotRequest(rid, include_config))
        assert isinstance(reply, SnapshotReply)
        self.devices = [Device(self, info) for info in reply.devices]
        return self.devices

    async def ping(self) -> None:
        """One protocol round trip that touches no device."""
        await self._call(PingRequest)

    async def _call(self, make: Callable[[int], Request]) -> Reply:
        if self._lost is not None:
            raise ConnectionLostError(self._lost)
        # Stay under the backend's in-flight limit. Parking only when full keeps the
        # common path free of scheduler round trips (a Semaphore would yield every time).
        while len(self._pending) >= self._max_in_flight:
            await self._slot_free.park()
            if self._lost is not None:
                raise ConnectionLostError(self._lost)
        rid = self._conn.next_request_id()
        frame = self._conn.send(make(rid))
        pending = _Pending(trio.current_time())
        self._pending[rid] = pending
        stats = self.stats
        stats.requests_sent += 1
        if len(self._pending) > stats.max_in_flight_seen:
            stats.max_in_flight_seen = len(self._pending)
        try:
            await self._send(frame)
            await pending.event.wait()
        finally:
            # On cancellation the reply may still come; the receive loop accounts for it.
            del self._pending[rid]
            self._slot_free.unpark()
        reply = pending.reply
        if reply is None:
            raise ConnectionLostError(self._lost or "connection closed")
        if isinstance(reply, ErrorReply):
            stats.errors_received += 1
            raise error_for_code(reply.code, reply.message)
        return reply

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
            for pending in list(self._pending.values()):
                if pending.started < deadline and not pending.event.is_set():
                    pending.reply = ErrorReply(
                        0,
                        ErrorCode.TIMED_OUT,
                        f"no reply from the backend within {timeout} s; it may be overloaded "
                        "or stuck (raise timeout= in connect() if this is expected)",
                    )
                    pending.event.set()

    async def _send(self, frame: bytes) -> None:
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            await self._transport.send_frame(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail_all(f"connection to the backend lost while sending: {exc}")
            raise ConnectionLostError(self._lost or str(exc)) from exc
        finally:
            lock.release()

    def _fail_all(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
        for pending in self._pending.values():
            pending.event.set()
        self._slot_free.unpark_all()

    async def _receive_loop(self) -> None:
        conn, transport = self._conn, self._transport
        try:
            while True:
                frame = await transport.receive_frame()
                msg = conn.receive(frame)
                if isinstance(msg, Reply):
                    self.stats.replies_received += 1
                    pending = self._pending.get(msg.request_id)
                    if pending is None:
                        log.debug(
                            "reply to request %d arrived after it was cancelled", msg.request_id
                        )
                        continue
                    pending.reply = msg
                    pending.event.set()
                elif isinstance(msg, Event):
                    self.stats.events_received += 1
                    self._events_send.send_nowait(msg)
                elif isinstance(msg, Goodbye):
                    self._fail_all(
                        f"backend closed the connection ({msg.code.name}): {msg.message}"
                    )
                    return
        except trio.EndOfChannel:
            self._fail_all("the backend closed the connection")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail_all(f"connection to the backend broke: {exc}")
        except trio.WouldBlock:
            self._fail_all("events arrived faster than the guest consumed them (256 buffered)")
        except RemoteProtocolError as exc:
            self._fail_all(f"the backend violated the protocol: {exc}")
            log.error("backend protocol violation: %s", exc)

    async def aclose(self) -> None:
        """Say goodbye and close the transport. Idempotent."""
        if self._lost is None:
            with trio.move_on_after(1):
                try:
                    await self._send(self._conn.close(ErrorCode.OK, "guest closing"))
                except (ConnectionLostError, PcisplitError):
                    pass  # already gone: nothing to say goodbye to
        self._fail_all("the connection was closed by the guest")
        await self._transport.aclose()


async def _handshake(
    transport: FrameTransport, guest: str, limits: Limits, timeout: float | None
) -> Connection:
    conn = Connection(Role.CLIENT, limits=limits, features=FRONTEND_FEATURES, guest=guest)
    try:
        await transport.send_frame(conn.hello())
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            frame = await transport.receive_frame()
    except (trio.EndOfChannel, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f" ({cause})" if cause is not None else ""
        raise ConnectionLostError(
            f"the backend closed the connection during the handshake{detail}; over tls:// this "
            "usually means it refused our client certificate (pass --cert/--key naming the guest)"
        ) from exc
    except trio.TooSlowError as exc:
        raise ConnectionLostError(
            f"the backend did not answer the handshake within {timeout} s"
        ) from exc
    reply = conn.receive(frame)
    if isinstance(reply, HandshakeRejected):
        raise HandshakeError(reply.code, reply.message)
    transport.set_max_frame_size(min(limits.max_message_size, conn.peer_limits.max_message_size))
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
) -> AsyncIterator[Bus]:
    """Connect to a backend, act as ``guest``, and yield its :class:`Bus`.

    ``address`` is a transport address (``unix:/path``, ``shm:/path``,
    ``tcp://host:port``, ``tls://host:port``, ``vsock://cid:port``, ``memory:name``).
    ``timeout`` bounds the handshake and each request (None: wait forever).
    ``include_config`` fetches every device's config image in the first snapshot.
    """
    limits = limits or Limits()
    opts = options or TransportOptions()
    opts.max_frame_size = limits.max_message_size
    transport = await open_transport(address, opts)
    try:
        conn = await _handshake(transport, guest, limits, timeout)
    except BaseException:
        with trio.CancelScope(shield=True):
            await transport.aclose()
        raise
    bus = Bus(transport, conn, timeout=timeout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus._receive_loop)
            nursery.start_soon(bus._watchdog)
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
