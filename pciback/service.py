"""The backend service: listeners, one trio task tree per connection, clean shutdown."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from pciback.config import BackendConfig
from pciback.dma import DmaHub
from pciback.irq import InterruptLimits, IrqRouter
from pciback.registry import DeviceRegistry
from pciback.session import GuestSession
from shared.errors import ErrorCode, PcisplitError, RemoteProtocolError
from shared.evtchn import EventfdStalledError
from shared.protocol import (
    Connection,
    Hello,
    Role,
)
from shared.transport import (
    FrameListener,
    FrameTransport,
    TransportOptions,
    get_scheme,
    open_listener,
    split_address,
)

__all__ = ["Backend", "BackendStatistics"]

log = logging.getLogger("pcisplit.backend")

#: Features this backend offers in the handshake.
BACKEND_FEATURES = (
    "bus-snapshot",
    "config-access",
    "bar-access",
    "reset",
    "ping",
    "interrupts",
    "dma",
)


@dataclass
class BackendStatistics:
    connections_accepted: int = 0
    connections_active: int = 0
    handshakes_rejected: int = 0
    requests: int = 0
    protocol_errors: int = 0
    disconnects_for_misbehaviour: int = 0
    per_guest_requests: dict[str, int] = field(default_factory=dict)


def server_ssl_context(config: BackendConfig) -> ssl.SSLContext | None:
    """TLS server context: guests must present a certificate signed by ``tls.ca``."""
    if config.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    if config.tls.ca is not None:
        ctx.load_verify_locations(str(config.tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Backend:
    """Serves the configured devices to guests on every listen address.

    ``await backend.serve(task_status=...)`` binds every address, reports the
    bound addresses through ``task_status.started(list_of_addresses)``, and runs
    until cancelled. Each accepted connection gets its own task tree, so one
    misbehaving guest is disconnected without affecting the others.
    """

    def __init__(
        self,
        config: BackendConfig,
        *,
        extra_listen: Sequence[str] = (),
        registry: DeviceRegistry | None = None,
        handshake_timeout: float = 10.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.config = config
        self.registry = registry or DeviceRegistry(config)
        #: Interrupt delivery; ``clock`` drives its rate limits (MockClock in tests).
        self.irq = IrqRouter(
            InterruptLimits(
                max_events_per_second=config.irq_max_events_per_second, burst=config.irq_burst
            ),
            clock=clock,
        )
        self.dma = DmaHub(call_timeout=config.dma_call_timeout)
        self.registry.release_hooks.append(self.irq.reset_device)
        self.sessions: list[GuestSession] = []
        self.addresses = list(dict.fromkeys([*config.listen, *extra_listen]))
        self.handshake_timeout = handshake_timeout
        self.stats = BackendStatistics()
        self.listeners: list[FrameListener] = []
        self._ssl = server_ssl_context(config)

    def statistics(self) -> BackendStatistics:
        return self.stats

    def _options(self, address: str) -> TransportOptions:
        return TransportOptions(
            ssl_context=self._ssl,
            max_frame_size=self.config.limits.max_message_size,
            poll_us=self.config.shm_poll_us,
            ring_size=self.config.shm_ring_size,
        )

    async def serve(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if not self.addresses:
            raise PcisplitError(
                "nothing to listen on: give --listen ADDR or `listen` in the config"
            )
        try:
            for address in self.addresses:
                listener = await open_listener(address, self._options(address))
                self.listeners.append(listener)
                log.info("listening on %s", listener.address)
            async with trio.open_nursery() as nursery:
                for dev in self.registry:
                    if dev.runtime is None:
                        dev.start(
                            nursery, interrupts=self.irq.device(dev), dma=self.dma.device(dev)
                        )
                for listener in self.listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started([lst.address for lst in self.listeners])
        finally:
            with trio.CancelScope(shield=True):
                for listener in self.listeners:
                    await listener.aclose()

    async def _accept_loop(self, listener: FrameListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                transport = await listener.accept()
            except (trio.BrokenResourceError, OSError) as exc:
                # A failed TLS handshake or an aborted connect affects that peer only.
                log.warning("%s: connection failed before the handshake: %s", listener.address, exc)
                continue
            self.stats.connections_accepted += 1
            nursery.start_soon(self._serve_connection, transport, listener.address)

    async def _serve_connection(self, transport: FrameTransport, address: str) -> None:
        self.stats.connections_active += 1
        peer = f"{transport.describe()}"
        try:
            await self._run_connection(transport, address)
        except (trio.BrokenResourceError, trio.EndOfChannel, trio.ClosedResourceError) as exc:
            if isinstance(exc, EventfdStalledError) or isinstance(
                exc.__cause__, (RemoteProtocolError, EventfdStalledError)
            ):
                # The transport caught the peer lying about framing (e.g. a 1 GiB length).
                self.stats.disconnects_for_misbehaviour += 1
                log.warning("%s: disconnected: %s", peer, exc)
            else:
                log.info("%s: peer went away: %s", peer, exc or type(exc).__name__)
        except RemoteProtocolError as exc:
            self.stats.disconnects_for_misbehaviour += 1
            log.warning("%s: disconnected for a protocol violation: %s", peer, exc)
        except trio.TooSlowError:
            self.stats.disconnects_for_misbehaviour += 1
            log.warning(
                "%s: no handshake within %.1f s; disconnected", peer, self.handshake_timeout
            )
        finally:
            self.stats.connections_active -= 1
            with trio.CancelScope(shield=True):
                await transport.aclose()

    async def _handshake(self, transport: FrameTransport, address: str) -> Connection | None:
        conn = Connection(Role.SERVER, limits=self.config.limits, features=BACKEND_FEATURES)
        with trio.fail_after(self.handshake_timeout):
            frame = await transport.receive_frame()
        hello = conn.receive(frame)
        assert isinstance(hello, Hello)
        refusal = self._refusal(hello, transport, address)
        problem: str | None
        if refusal is None:
            problem = conn.check_version()
            code = ErrorCode.VERSION_MISMATCH
        else:
            code, problem = refusal
        if problem is not None:
            self.stats.handshakes_rejected += 1
            log.warning("%s: handshake refused: %s", transport.describe(), problem)
            await transport.send_frame(conn.reject(code, problem))
            return None
        await transport.send_frame(conn.accept())
        transport.set_max_frame_size(self.config.limits.max_message_size)
        await transport.start_session(
            is_server=True, max_frame_size=self.config.limits.max_message_size
        )
        return conn

    def _refusal(
        self, hello: Hello, transport: FrameTransport, address: str
    ) -> tuple[ErrorCode, str] | None:
        guest = self.config.guests.get(hello.guest)
        if guest is None:
            return ErrorCode.UNKNOWN_GUEST, (
                f"guest {hello.guest!r} is not known to this backend; known guests are declared "
                "with [[guest]] in the backend config"
            )
        scheme, _ = split_address(address)
        if not get_scheme(scheme.name).secure and not guest.allow_plain_tcp:
            return ErrorCode.ACCESS_DENIED, (
                f"guest {hello.guest!r} may not connect over {scheme.name}:// without TLS; "
                "use tls:// or set allow_plain_tcp = true for this guest in the backend config"
            )
        identity: dict[str, Any] = transport.peer_identity()
        names = identity.get("tls_names")
        if names is not None and hello.guest not in names:
            return ErrorCode.ACCESS_DENIED, (
                f"the TLS client certificate names {', '.join(map(repr, names)) or 'nobody'}, "
                f"but the frontend asked to act as guest {hello.guest!r}; issue the guest a "
                "certificate whose CN or DNS subjectAltName is its guest name"
            )
        return None

    async def _run_connection(self, transport: FrameTransport, address: str) -> None:
        conn = await self._handshake(transport, address)
        if conn is None:
            return
        guest = conn.guest
        assert guest is not None
        log.info("%s: guest %s connected", transport.describe(), guest)
        session = GuestSession(
            transport,
            conn,
            registry=self.registry,
            router=self.irq,
            dma=self.dma.space(guest),
            backend_stats=self.stats,
        )
        self.sessions.append(session)
        try:
            await session.run()
        finally:
            self.sessions.remove(session)
