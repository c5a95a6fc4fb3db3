"""One connection as the guest sees it, with no I/O: the handshake, requests, and routing.

Like h11, whose example client only moves bytes between a socket and the
protocol object, both pcifront clients move frames between a transport and a
:class:`ClientCore`; everything the frames mean is decided here, once:

* the handshake: :meth:`ClientCore.hello` makes the first frame,
  :meth:`ClientCore.welcome` applies the backend's answer and returns the
  frame size both sides use (or raises :class:`~pcifront.HandshakeError`);
* a request: :meth:`ClientCore.request` numbers it, builds it (a bad argument
  becomes the typed error of its code, and nothing is sent) and encodes it;
* every frame the backend sends, through :meth:`ClientCore.receive`, which
  routes it to its action:

  ============================  ==================================================
  a reply                       handed to the caller waiting for it (``resolve``);
                                one nobody waits for any more is counted as late
  an interrupt                  posted to the device's ``interrupts()`` block
                                (:class:`~pcifront.core.routes.InterruptRoutes`)
  a DMA call                    answered from the guest's buffers
                                (:class:`~pcifront.core.dma.DmaSpace`): the result
                                frame is returned, for the client to send at once
  a DMA fault                   counted, logged, handed to ``fault``
  a hot-plug event              applied (``apply_change``), then acknowledged: the
                                acknowledgement frame is returned to send
  any other event               handed to ``event`` (which may end the connection
                                when its buffer is full)
  Goodbye, a protocol error     :class:`ConnectionEnded` with the reason
  ============================  ==================================================

What waits for each action (a parked trio task, a blocking loop) belongs to
the client and is handed to :meth:`ClientCore.attach`. A lost transport is
the client's to notice (only it reads); :func:`transport_ended` words the
reason the same way for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from pcifront.core.errors import ConnectionLostError, HandshakeError, error_for_code
from pcifront.core.routes import BusStatistics, InterruptRoutes
from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.pci import PciAddress
from shared.protocol import (
    TERMINAL_STATES,
    Connection,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceRemovedEvent,
    DmaCallResult,
    DmaFaultEvent,
    DmaReadCall,
    DmaWriteCall,
    Event,
    Goodbye,
    HandshakeRejected,
    InterruptEvent,
    Limits,
    Reply,
    Request,
    Role,
)

__all__ = [
    "CLOSED_BY_GUEST",
    "ClientCore",
    "ConnectionEnded",
    "DmaAnswers",
    "handshake_closed",
    "handshake_timed_out",
    "transport_ended",
]

log = logging.getLogger("pcisplit.frontend")

#: Why a connection ended when we said Goodbye first.
CLOSED_BY_GUEST = "the connection was closed by the guest"


class ConnectionEnded(ConnectionLostError):
    """The backend ended the connection, or broke the protocol: ``reason`` says which.

    Raised by :meth:`ClientCore.receive` (and by an ``event`` handler whose
    buffer is full); the client fails every waiting request with ``reason``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DmaAnswers(Protocol):
    """What answers the backend's DMA calls (:class:`~pcifront.core.dma.DmaSpace`)."""

    def answer(self, call: DmaReadCall | DmaWriteCall) -> DmaCallResult: ...


def transport_ended(eof: bool, error: BaseException | None = None) -> str:
    """The reason for a transport that reached its end (``eof``) or broke with ``error``."""
    if eof:
        return "the backend closed the connection"
    return f"connection to the backend broke: {error}"


def handshake_closed(cause: BaseException | None, *, tls: bool) -> ConnectionLostError:
    """The error for a backend that closed the connection before answering the Hello."""
    detail = f" ({cause})" if cause is not None else ""
    hint = (
        "; over tls:// this usually means it refused our client certificate (pass "
        "--cert/--key naming the guest)"
        if tls
        else "; is the address a pcisplit backend?"
    )
    return ConnectionLostError(
        f"the backend closed the connection during the handshake{detail}{hint}"
    )


def handshake_timed_out(timeout: float | None) -> ConnectionLostError:
    """The error for a backend that did not answer the Hello within ``timeout`` seconds."""
    return ConnectionLostError(f"the backend did not answer the handshake within {timeout} s")


class ClientCore:
    """The guest's side of one connection: a :class:`~shared.protocol.Connection`
    plus what each frame means for the guest. Does no I/O (see the module docstring).
    """

    __slots__ = (
        "_apply_change",
        "_dma",
        "_event",
        "_fault",
        "_max_in_flight",
        "_resolve",
        "_routes",
        "conn",
        "stats",
    )

    def __init__(self, guest: str, *, limits: Limits, features: tuple[str, ...]) -> None:
        #: The protocol state machine of this connection.
        self.conn = Connection(Role.CLIENT, limits=limits, features=features, guest=guest)
        self.stats = BusStatistics()
        self._max_in_flight = 0

    # -- the handshake ------------------------------------------------------------------

    def hello(self, token: bytes = b"") -> bytes:
        """The first frame to send: our version, features, limits, guest and ``token``."""
        return self.conn.hello(token)

    def welcome(self, frame: bytes) -> int:
        """Apply the backend's answer to the Hello; returns the frame size of this connection.

        Raises :class:`~pcifront.HandshakeError` when the backend refused us.
        """
        reply = self.conn.receive(frame)
        if isinstance(reply, HandshakeRejected):
            raise HandshakeError(reply.code, reply.message)
        self._max_in_flight = self.conn.peer_limits.max_in_flight
        return self.conn.frame_size

    @property
    def guest(self) -> str:
        """The guest this connection acts for."""
        guest = self.conn.guest
        assert guest is not None
        return guest

    @property
    def features(self) -> tuple[str, ...]:
        """The optional features both sides support."""
        return self.conn.features

    # -- where routed frames go ---------------------------------------------------------

    def attach(
        self,
        *,
        stats: BusStatistics,
        resolve: Callable[[int, Reply], object | None],
        routes: InterruptRoutes,
        dma: DmaAnswers,
        event: Callable[[Event], None],
        fault: Callable[[DmaFaultEvent], None] | None = None,
        apply_change: Callable[[DeviceAddedEvent | DeviceRemovedEvent], None] | None = None,
    ) -> None:
        """Say where :meth:`receive` delivers each kind of frame.

        ``resolve(request_id, reply)`` hands a reply to its caller and returns
        None when nobody waits for it. ``event`` takes the events no other
        handler takes; it raises :class:`ConnectionEnded` when it cannot keep
        one. Without ``apply_change`` hot-plug events go to ``event`` too, and
        are not acknowledged.
        """
        self.stats = stats
        self._resolve = resolve
        self._routes = routes
        self._dma = dma
        self._event = event
        self._fault = fault
        self._apply_change = apply_change

    # -- requests -----------------------------------------------------------------------

    def full(self) -> bool:
        """True while the backend's in-flight limit is reached (a request must wait).

        The connection counts a request until its reply comes, also after its
        caller gave up, so the limit is never exceeded.
        """
        return self.conn.requests_in_flight >= self._max_in_flight

    def request(self, make: Callable[[int], Request]) -> tuple[int, bytes]:
        """Number the request ``make(request_id)`` builds and encode it: (its id, the frame).

        A bad argument (offset 0x1000, size 3...) raises the typed error of
        its code (:class:`~pcifront.InvalidAccessError`...) and nothing is sent:
        the protocol's own checks are the one rule.
        """
        conn = self.conn
        rid = conn.next_request_id()
        try:
            request = make(rid)
        except LocalProtocolError as exc:
            raise error_for_code(exc.code, str(exc)) from exc
        self.stats.requests_sent += 1
        return rid, conn.send(request)

    def goodbye(self) -> bytes | None:
        """The Goodbye frame that closes the connection; None once it has ended."""
        conn = self.conn
        if conn.state in TERMINAL_STATES:
            return None
        return conn.close(ErrorCode.OK, "guest closing")

    # -- receiving ----------------------------------------------------------------------

    def receive(self, frame: bytes) -> bytes | None:
        """Apply one frame from the backend and route it (see the module docstring).

        Returns a frame to send back at once, in order (a DMA call's result, a
        hot-plug acknowledgement), or None. Raises :class:`ConnectionEnded`
        when the connection is over.
        """
        conn = self.conn
        if conn.state in TERMINAL_STATES:
            # We said Goodbye while frames were on their way: nothing more is read.
            raise ConnectionEnded(CLOSED_BY_GUEST)
        try:
            msg = conn.receive(frame)
        except RemoteProtocolError as exc:
            log.error("backend protocol violation: %s", exc)
            raise ConnectionEnded(f"the backend violated the protocol: {exc}") from exc
        stats = self.stats
        if isinstance(msg, Reply):
            stats.replies_received += 1
            if self._resolve(msg.request_id, msg) is None:
                stats.late_replies += 1
                log.debug("reply to request %d arrived after it was cancelled", msg.request_id)
            return None
        if isinstance(msg, Event):
            stats.events_received += 1
            if isinstance(msg, InterruptEvent):
                self._routes.route_interrupt(msg.device, msg.vector, msg.count)
            elif isinstance(msg, (DmaReadCall, DmaWriteCall)):
                # A memory copy: answered inline, in order.
                return conn.send(self._dma.answer(msg))
            elif isinstance(msg, DmaFaultEvent):
                self._on_fault(msg)
            elif isinstance(msg, (DeviceAddedEvent, DeviceRemovedEvent)) and (
                self._apply_change is not None
            ):
                # Applied at once (never blocks), then acknowledged in order.
                stats.hotplug_events += 1
                self._apply_change(msg)
                return conn.send(DeviceChangeAck(msg.change_id))
            else:
                self._event(msg)
            return None
        if isinstance(msg, Goodbye):
            raise ConnectionEnded(
                f"backend closed the connection ({msg.code.name}): {msg.message}"
            )
        return None

    def _on_fault(self, event: DmaFaultEvent) -> None:
        self.stats.dma_faults += 1
        log.warning(
            "device %s DMA fault: %s %d bytes at %#x: %s",
            PciAddress.unpack(event.device), "write" if event.is_write else "read",
            event.length, event.bus_address, event.message,
        )
        if self._fault is not None:
            self._fault(event)
