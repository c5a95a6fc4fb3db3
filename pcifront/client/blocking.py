"""The blocking client, driven from the calling thread (public as :mod:`pcifront.blocking`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import trio

from pcifront.core.dma import DmaSpace
from pcifront.core.errors import ConnectionLostError, error_for_code
from pcifront.core.routes import BusStatistics, InterruptRoutes
from pcifront.core.session import (
    CLOSED_BY_GUEST,
    ClientCore,
    ConnectionEnded,
    handshake_closed,
    handshake_timed_out,
    transport_ended,
)
from pcifront.core.vectors import (
    Interrupt,
    VectorCounts,
    check_free,
    check_interrupt_args,
    check_mask_args,
)
from pcifront.core.views import BusView, DeviceView
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import (
    FUNCTION_MASK_VECTOR,
    IRQ_MODE_INTX,
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    DeviceInfo,
    ErrorReply,
    Event,
    InterruptDisableRequest,
    InterruptEnableRequest,
    InterruptEoiRequest,
    InterruptMaskRequest,
    Limits,
    PingRequest,
    Reply,
    Request,
    ResetRequest,
    SnapshotReply,
    SnapshotRequest,
    ValueReply,
)
from shared.transport import BlockingTransport, TransportOptions, open_blocking_transport

__all__ = [
    "connect",
    "Bus",
    "Device",
    "Interrupts",
    "ReceiveTimeoutError",
    "BLOCKING_FEATURES",
]

log = logging.getLogger("pcisplit.frontend.blocking")

#: What the blocking client offers. No "dma": it maps no guest memory (a DMA
#: call from the backend is answered with DMA_FAULT).
BLOCKING_FEATURES = ("bus-snapshot", "config-access", "bar-access", "reset", "ping", "interrupts")
#: Events other than interrupts/DMA buffered before the connection is failed (as in the trio API).
EVENT_BUFFER = 256


class ReceiveTimeoutError(PcisplitError, TimeoutError):
    """:meth:`Interrupts.receive` waited ``timeout`` seconds and no interrupt came."""

    code = ErrorCode.TIMED_OUT


class Interrupts(VectorCounts):
    """The interrupts of one device inside its ``with dev.interrupts(...)`` block."""

    def __init__(self, bus: Bus, packed: int, address: str, mode: str, vectors: int) -> None:
        routes = bus._routes
        super().__init__(address, mode, vectors, lambda count: routes.count_stray(packed, count))
        self._bus = bus
        self._packed = packed

    def receive_nowait(self) -> Interrupt | None:
        """The next pending interrupt, or None. Reads nothing from the transport."""
        self._check_open()
        return self._take()

    def receive(self, timeout: float | None = None) -> Interrupt:
        """Wait for the next interrupt (at most ``timeout`` seconds; None: forever).

        Raises :class:`ReceiveTimeoutError` when none came in time.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        bus = self._bus
        with bus._lock:
            while True:
                irq = self._take()
                if irq is not None:
                    return irq
                if not bus._pump(deadline):
                    raise ReceiveTimeoutError(
                        f"no interrupt from {self._address} within {timeout} s"
                    )

    def __iter__(self) -> Iterator[Interrupt]:
        while not self._closed:
            yield self.receive()

    def eoi(self, irq: Interrupt | int) -> None:
        """End of interrupt. INTx: unmask the line. A no-op for MSI and MSI-X."""
        if self._mode_code != IRQ_MODE_INTX:
            return
        vector = irq.vector if isinstance(irq, Interrupt) else irq
        packed = self._packed
        self._bus._call(lambda rid: InterruptEoiRequest(rid, packed, vector))
        self._eois += 1

    def mask(self, vector: int) -> None:
        self._mask(vector, True)

    def unmask(self, vector: int) -> None:
        self._mask(vector, False)

    def mask_function(self) -> None:
        self._mask(FUNCTION_MASK_VECTOR, True)

    def unmask_function(self) -> None:
        self._mask(FUNCTION_MASK_VECTOR, False)

    def _mask(self, vector: int, masked: bool) -> None:
        check_mask_args(self._mode_code, vector, self.vectors)
        packed = self._packed
        self._bus._call(lambda rid: InterruptMaskRequest(rid, packed, vector, masked))

    def _check_open(self) -> None:
        if self._closed:
            raise PcisplitError(
                f"the interrupts() block of {self._address} has ended",
                code=ErrorCode.INVALID_STATE,
            )


class Device(DeviceView):
    """One function on the guest's virtual bus (blocking calls)."""

    def __init__(self, bus: Bus, info: DeviceInfo) -> None:
        super().__init__(info)
        self._bus = bus

    def config_read(self, offset: int, size: int) -> int:
        """Read 1, 2 or 4 bytes of config space."""
        packed = self._packed
        reply = self._bus._call(lambda rid: ConfigReadRequest(rid, packed, offset, size))
        assert isinstance(reply, ValueReply)
        return reply.value

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write 1, 2 or 4 bytes of config space (the backend's policy may refuse)."""
        packed = self._packed
        self._bus._call(lambda rid: ConfigWriteRequest(rid, packed, offset, size, value))

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        """Read 1, 2, 4 or 8 bytes from BAR ``bar``."""
        packed = self._packed
        reply = self._bus._call(lambda rid: BarReadRequest(rid, packed, bar, offset, size))
        assert isinstance(reply, ValueReply)
        return reply.value

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """Write 1, 2, 4 or 8 bytes to BAR ``bar``."""
        packed = self._packed
        self._bus._call(lambda rid: BarWriteRequest(rid, packed, bar, offset, size, value))

    def reset(self) -> None:
        """Reset the device to its power-on state."""
        packed = self._packed
        self._bus._call(lambda rid: ResetRequest(rid, packed))

    @contextmanager
    def interrupts(self, mode: str = "msi", vectors: int = 1) -> Iterator[Interrupts]:
        """Enable ``mode`` (``"intx"``, ``"msi"``, ``"msix"``) for the block; disable it after."""
        bus = self._bus
        code = check_interrupt_args(mode, vectors, bus.features)
        packed = self._packed
        with bus._lock:
            check_free(bus._routes, packed, self.address)
            reply = bus._call(lambda rid: InterruptEnableRequest(rid, packed, code, vectors))
            assert isinstance(reply, ValueReply)
            irqs = Interrupts(bus, packed, self.address, mode, max(1, min(reply.value, vectors)))
            bus._routes.attach_interrupts(packed, irqs)
        try:
            yield irqs
        finally:
            with bus._lock:
                bus._routes.detach_interrupts(packed, irqs)
                irqs._close()
                if bus._lost is None:
                    try:
                        bus._call(lambda rid: InterruptDisableRequest(rid, packed, code))
                    except PcisplitError as exc:
                        log.warning("%s: disabling %s interrupts failed: %s",
                                    self.address, mode, exc)


class Bus(BusView["Device"]):
    """A connected guest's virtual PCI bus, driven from the calling thread."""

    def __init__(
        self, transport: BlockingTransport, core: ClientCore, *, timeout: float | None
    ) -> None:
        self._transport = transport
        self._core = core
        self._timeout = timeout
        self._lock = threading.RLock()
        self._waiting: set[int] = set()
        self._replies: dict[int, Reply] = {}
        self._lost: str | None = None
        self.stats = BusStatistics()
        self._routes = InterruptRoutes(self.stats)
        self._dma = DmaSpace()  # stays empty: every DMA call is answered with DMA_FAULT
        self._events: list[Event] = []
        self.devices: list[Device] = []
        core.attach(
            stats=self.stats, resolve=self._resolve, routes=self._routes, dma=self._dma,
            event=self._keep_event,
        )

    def _current_core(self) -> ClientCore:
        return self._core

    @property
    def transport(self) -> BlockingTransport:
        return self._transport

    def take_events(self) -> list[Event]:
        """Events other than interrupts and DMA that arrived so far (and forget them)."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def refresh(self, *, include_config: bool = False) -> list[Device]:
        """Take a bus snapshot and rebuild :attr:`devices`."""
        reply = self._call(lambda rid: SnapshotRequest(rid, include_config))
        assert isinstance(reply, SnapshotReply)
        self.devices = [Device(self, info) for info in reply.devices]
        return self.devices

    def ping(self) -> None:
        """One protocol round trip that touches no device."""
        self._call(PingRequest)

    # -- the one request path ---------------------------------------------------------
    def _call(self, make: Callable[[int], Request]) -> Reply:
        with self._lock:
            if self._lost is not None:
                raise ConnectionLostError(self._lost)
            rid, frame = self._core.request(make)
            self._waiting.add(rid)
            try:
                self._send(frame)
                timeout = self._timeout
                deadline = None if timeout is None else time.monotonic() + timeout
                while (reply := self._replies.pop(rid, None)) is None:
                    if not self._pump(deadline):
                        raise error_for_code(
                            ErrorCode.TIMED_OUT,
                            f"no reply from the backend within {timeout} s; it may be "
                            "overloaded or stuck (raise timeout= in connect() if expected)",
                        )
            finally:
                self._waiting.discard(rid)
        if isinstance(reply, ErrorReply):
            self.stats.errors_received += 1
            raise error_for_code(reply.code, reply.message)
        return reply

    def _send(self, frame: bytes) -> None:
        try:
            self._transport.send_frame(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._fail(f"connection to the backend lost while sending: {exc}") from exc

    def _fail(self, reason: str) -> ConnectionLostError:
        if self._lost is None:
            self._lost = reason
        return ConnectionLostError(self._lost)

    # -- what the core routes here --------------------------------------------------------
    def _resolve(self, request_id: int, reply: Reply) -> Reply | None:
        if request_id not in self._waiting:
            return None  # its caller timed out: late
        self._replies[request_id] = reply
        return reply

    def _keep_event(self, event: Event) -> None:
        if len(self._events) >= EVENT_BUFFER:
            raise ConnectionEnded(
                f"events arrived faster than the guest consumed them ({EVENT_BUFFER} "
                "buffered; call take_events())"
            )
        self._events.append(event)

    def _pump(self, deadline: float | None) -> bool:
        """Receive one frame and let the core route it. False: ``deadline`` passed first."""
        if self._lost is not None:
            raise ConnectionLostError(self._lost)
        try:
            frame = self._transport.receive_frame(deadline)
        except trio.EndOfChannel as exc:
            raise self._fail(transport_ended(True)) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._fail(transport_ended(False, exc)) from exc
        if frame is None:
            return False
        try:
            answer = self._core.receive(frame)
        except ConnectionEnded as exc:
            raise self._fail(exc.reason) from exc
        if answer is not None:
            self._send(answer)  # a DMA call's result: in order, before anything else
        return True

    def close(self) -> None:
        """Say goodbye and close the transport. Idempotent."""
        with self._lock:
            if self._lost is None:
                goodbye = self._core.goodbye()
                try:
                    if goodbye is not None:
                        self._transport.send_frame(goodbye)
                except (trio.BrokenResourceError, trio.ClosedResourceError, PcisplitError):
                    pass  # already gone: nothing to say goodbye to
                self._lost = CLOSED_BY_GUEST
            self._transport.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _handshake(
    transport: BlockingTransport, core: ClientCore, timeout: float | None, token: bytes,
    *, tls: bool,
) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        transport.send_frame(core.hello(token))
        frame = transport.receive_frame(deadline)
    except (trio.EndOfChannel, trio.BrokenResourceError) as exc:
        raise handshake_closed(exc.__cause__ or exc.__context__, tls=tls) from exc
    if frame is None:
        raise handshake_timed_out(timeout)
    size = core.welcome(frame)
    transport.set_max_frame_size(size)
    transport.start_session(size)


def connect(
    address: str,
    guest: str = "guest0",
    *,
    options: TransportOptions | None = None,
    limits: Limits | None = None,
    timeout: float | None = 60.0,
    poll_us: float | None = None,
    include_config: bool = False,
    token: bytes | str | None = None,
) -> Bus:
    """Connect to a backend as ``guest`` and return its :class:`Bus` (use ``with``).

    ``address``: ``unix:/path``, ``shm:/path``, ``tcp://host:port`` or
    ``tls://host:port`` (``options.ssl_context`` holds the CA and the client
    certificate). ``timeout`` bounds the handshake and each request (None:
    wait forever). ``poll_us`` (``shm:`` only) spins that many microseconds on
    the ring before sleeping; it pays on dedicated cores only. ``token`` is the
    guest's secret for ``tcp://`` backends that ask for one (as in
    :func:`pcifront.connect`).
    """
    secret = token.encode() if isinstance(token, str) else (token or b"")
    limits = limits or Limits()
    opts = options or TransportOptions()
    opts.max_frame_size = limits.max_message_size
    if poll_us is not None:
        opts.poll_us = poll_us
    transport = open_blocking_transport(address, opts)
    try:
        core = ClientCore(guest, limits=limits, features=BLOCKING_FEATURES)
        _handshake(transport, core, timeout, secret.strip(), tls=address.startswith("tls:"))
        bus = Bus(transport, core, timeout=timeout)
        bus.refresh(include_config=include_config)
    except BaseException:
        transport.close()
        raise
    return bus
