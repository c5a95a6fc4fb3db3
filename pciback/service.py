"""The backend service: listeners, one trio task tree per connection, clean shutdown.

This is the one composition root of the backend: it builds the device plane
(registry, IRQ router, DMA hub, hot-plug), the guest side's gate and
listeners, and starts the control socket. Operations reach it only through
:class:`pciback.ops.interface.OperatedBackend`, which :class:`Backend`
satisfies; only the command line (``pciback.cli``) sits above it.

Containment
-----------
Every accepted connection runs in its own task tree under
:meth:`Backend._serve_connection`, which is a net: the ways a connection
normally ends (the guest leaves, breaks the protocol, is too slow) are logged
as such, and **any other exception** from anything the connection runs - the
handshake, the session and its tasks, the transport (a plugin's ``describe``
or ``aclose``) - ends that connection only. It is logged once, with its
traceback, at error level, counted in
:attr:`BackendStatistics.connections_crashed`, and the service goes on
serving everyone else. The net is not the fix: each such failure is a bug to
fix where it happens (issue 8 lists the ones found); the net keeps one bug
from becoming a denial of service for every guest.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from pciback._ratelog import MODEL_LOG, RateLimitedLog, RateLogStatistics
from pciback.config import BackendConfig, DeviceConfig, check_listen
from pciback.devices import DeviceProvider, HostDevice
from pciback.guests._accept import accept_loop
from pciback.guests.fairness import FairTurns
from pciback.guests.handshake import server_handshake
from pciback.guests.limits import ConnectionGate, GateTicket, source_of
from pciback.guests.listen import listen_hint, server_ssl_context
from pciback.guests.session import GuestSession
from pciback.guests.statistics import BackendStatistics
from pciback.ops.interface import ConnectionInfo
from pciback.plane.dma import DmaHub
from pciback.plane.hoststate import HostStateFile, state_path_for
from pciback.plane.hotplug import Hotplug, HotplugResult
from pciback.plane.irq import InterruptLimits, IrqRouter
from pciback.plane.registry import DeviceRegistry, ServedDevice
from shared.errors import (
    ConfigFileError,
    ErrorCode,
    LimitExceededError,
    PcisplitError,
    RemoteProtocolError,
    reason,
)
from shared.evtchn import EventfdStalledError
from shared.pci import PciAddress
from shared.protocol import Goodbye
from shared.transport import (
    FrameListener,
    FrameTransport,
    ReceiveBudget,
    TransportConnectError,
    TransportOptions,
    open_listener,
    split_address,
)

__all__ = ["Backend", "BackendStatistics"]

log = logging.getLogger("pcisplit.backend")

#: Seconds between checks for due "N more ... suppressed" summaries.
LOG_TICK = 1.0


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
        listen: Sequence[str] | None = None,
        registry: DeviceRegistry | None = None,
        handshake_timeout: float | None = None,
        clock: Callable[[], float] = trio.current_time,
        control: Path | None = None,
    ) -> None:
        self.config = config
        #: The admin socket ``serve`` opens (``pciback ctl``); None: no control socket.
        self.control_path = control
        #: The saved config of writable host devices, for the backend after a SIGKILL
        #: (``pciback.plane.hoststate``); kept beside the control socket, so none without one.
        self.host_state = None if control is None else HostStateFile(state_path_for(control))
        self.started_at: float | None = None
        resources = config.resources
        self.stats = BackendStatistics()
        self.registry = registry or DeviceRegistry(config)
        #: Interrupt delivery; ``clock`` drives its rate limits (MockClock in tests).
        self.irq = IrqRouter(
            InterruptLimits(
                max_events_per_second=resources.notifications_per_second,
                burst=resources.notification_burst,
            ),
            clock=clock,
        )
        self.dma = DmaHub(
            call_timeout=config.dma_call_timeout,
            max_windows=resources.max_dma_windows_per_guest,
            max_bytes=resources.max_dma_bytes_per_guest,
            limit_events=self.stats.limits_exceeded,
        )
        self.registry.release_hooks.append(self.irq.reset_device)
        #: Fair turns between guests busy at the same time (``pciback.guests.fairness``).
        self.fair = FairTurns()
        self.sessions: list[GuestSession] = []
        #: Guest-triggered log lines of sessions: counted, rate-limited per connection and
        #: kind, summarised (pciback/_ratelog.py; the IRQ router, the connection gate and
        #: the audit log have their own instances of the same rule).
        self.guest_log = RateLimitedLog(log, clock=clock)
        #: Lines control-socket clients cause (pciback.ops.control_server), by the same rule.
        self.control_log = RateLimitedLog(log, clock=clock)
        self._session_numbers = itertools.count(1)
        #: Live assign/unassign with acknowledgement (``assign``/``unassign`` below).
        self.hotplug = Hotplug(
            self.registry, self.sessions_of, ack_timeout=config.hotplug_ack_timeout
        )
        # ``listen`` (pciback serve --listen) replaces the config's addresses.
        chosen = config.listen if listen is None else listen
        self.addresses = list(dict.fromkeys([*chosen, *extra_listen]))
        check_listen(self.addresses, config.tls)
        #: Seconds a connection gets to complete its handshake (``limits.handshake_timeout``).
        self.handshake_timeout = (
            resources.handshake_timeout if handshake_timeout is None else handshake_timeout
        )
        #: Connection counts per guest, per source and in total (``[limits]``).
        self.gate = ConnectionGate(resources, clock=clock)
        self.gate.stats.exceeded = self.stats.limits_exceeded
        #: Receive-buffer bytes beyond each connection's reserve, shared by all of them.
        self.receive_budget = ReceiveBudget(resources.max_buffered_total)
        self.listeners: list[FrameListener] = []
        self._ssl = server_ssl_context(config)
        #: The nursery device runtimes run in, while serving (devices a reload adds start there).
        self._nursery: trio.Nursery | None = None

    def statistics(self) -> BackendStatistics:
        self.stats.log_lines_suppressed = sum(self.log_statistics().suppressed.values())
        return self.stats

    def _rate_logs(self) -> list[RateLimitedLog]:
        return [
            self.guest_log,
            self.control_log,
            self.irq.guest_log,
            self.gate.log,
            self.registry.audit.limiter,
            MODEL_LOG,
        ]

    def log_statistics(self) -> RateLogStatistics:
        """Guest-triggered log events by kind, logged and suppressed, from every limiter."""
        total = RateLogStatistics()
        for limiter in self._rate_logs():
            total.merge(limiter.statistics())
        return total

    def tick_logs(self) -> None:
        """Log the suppression summaries that are due (``serve`` runs this every second)."""
        for limiter in self._rate_logs():
            limiter.tick()

    async def _tick_logs_forever(self) -> None:
        while True:
            await trio.sleep(LOG_TICK)
            self.tick_logs()

    def sessions_of(self, guest: str) -> list[GuestSession]:
        """The guest's connected sessions (a guest may hold several connections)."""
        return [s for s in self.sessions if s.guest == guest]

    # --- what operations use (pciback.ops.interface.OperatedBackend) -------------------

    def connection_count(self, guest: str) -> int:
        """How many sessions ``guest`` has connected."""
        return sum(1 for s in self.sessions if s.guest == guest)

    def connections(self) -> list[ConnectionInfo]:
        """Every connected guest session, as ``ctl status`` shows it."""
        return [
            ConnectionInfo(
                guest=s.guest,
                number=s.number,
                transport=s.transport.describe(),
                requests=s.stats.requests,
                fds_held=s.held_fds(),
            )
            for s in self.sessions
        ]

    def bound_addresses(self) -> list[str]:
        """The addresses the backend listens on, as bound."""
        return [lst.address for lst in self.listeners]

    @property
    def forced_removals(self) -> int:
        """Hot-unplugs completed without every acknowledgement (after ``ack_timeout``)."""
        return self.hotplug.forced_removals

    def adopt_config(self, new: BackendConfig) -> None:
        """Make ``new`` the running configuration: what a reload changes first.

        The registry and hot-plug read it from now on, new guests get their
        bus, and free devices are hidden or offered as ``new.hide`` says.
        Devices whose definition or owner changed are moved by the caller
        (:func:`pciback.ops.lifecycle.reload`), through the methods below.
        """
        added = sorted(set(new.guests) - set(self.config.guests))
        self.config = new
        self.registry.config = new
        self.hotplug.ack_timeout = new.hotplug_ack_timeout
        for name in added:
            self.registry.add_guest(name, new.guests[name].bus)
        for dev in self.registry:
            if dev.state in ("free", "hidden") and dev.physical is not None:
                dev.hidden = new.is_hidden(dev.physical) is not None

    def remove_device(self, device_id: str) -> ServedDevice:
        """Stop serving the free device ``device_id`` (its interrupt state goes too)."""
        dev = self.registry.remove_device(device_id)
        self.irq.forget_device(dev)
        return dev

    def add_device(
        self, config: DeviceConfig, provider: DeviceProvider, physical: PciAddress | None
    ) -> ServedDevice:
        """Serve a new device, free, with its runtime started (assign it with :meth:`assign`)."""
        dev = self.registry.add_device(config, provider, physical)
        self.start_device(dev)
        return dev

    def record_host_state(self, *, devices_changed: bool) -> None:
        """Record the writable host devices in the state file (if one is kept and matters)."""
        if self.host_state is not None and (self.host_state.owned or devices_changed):
            self.host_state.record(self.writable_host_devices())

    async def assign(self, device_id: str, guest: str) -> HotplugResult:
        """Hot-plug ``device_id`` into ``guest`` (see :class:`pciback.plane.hotplug.Hotplug`)."""
        return await self.hotplug.assign(device_id, guest)

    async def unassign(
        self, device_id: str, *, reason: str = "unassigned by the operator"
    ) -> HotplugResult:
        """Hot-unplug ``device_id`` from its guest; reset and free it once acknowledged.

        Waits at most ``[hotplug] ack_timeout`` seconds for the guest's
        acknowledgement, then forces the removal (and logs it).
        """
        return await self.hotplug.unassign(device_id, reason=reason)

    async def say_goodbye(self, message: str) -> None:
        """Tell every connected guest that the backend is going away (before stopping).

        Each guest gets at most a second: one that does not read is not waited for.
        """
        for session in list(self.sessions):
            with trio.move_on_after(1.0):
                try:
                    await session.send(Goodbye(ErrorCode.OK, message[:1000]))
                except (trio.BrokenResourceError, trio.ClosedResourceError, PcisplitError) as exc:
                    log.info("guest %s: could not say goodbye: %s", session.guest, exc)

    @property
    def reset_failures(self) -> int:
        """Device resets that failed (logged); a device that cannot be reset is not trusted."""
        return self.registry.reset_failures

    async def reset_device(self, dev: ServedDevice, why: str) -> bool:
        """Reset one device under its lock: the model, the policy's registers, the IRQ state.

        Used when a guest's last connection ends, when the backend stops and by
        ``pciback ctl reset``; removal from a guest resets through
        :meth:`DeviceRegistry.release`. Shielded: a reset that has begun always
        completes. A failure is logged and counted (:meth:`DeviceRegistry.reset`),
        never raised into the caller's teardown, so it never skips another
        device's reset. Returns True when the reset succeeded.
        """
        with trio.CancelScope(shield=True):
            async with dev.lock:
                ok = self.registry.reset(dev, why)
        if ok:
            # Before serving began no guest could have touched it: housekeeping, not news.
            level = logging.INFO if self.started_at is not None else logging.DEBUG
            log.log(level, "device %s reset (%s)", dev.id, why)
        return ok

    def _options(self, address: str) -> TransportOptions:
        resources = self.config.resources
        return TransportOptions(
            ssl_context=self._ssl,
            # Until the handshake is done a peer gets a small budget (raised after it).
            max_frame_size=min(resources.max_handshake_bytes, self.config.limits.max_message_size),
            poll_us=self.config.shm_poll_us,
            ring_size=self.config.shm_ring_size,
            partial_frame_timeout=resources.partial_frame_timeout,
            max_buffered=resources.max_buffered_per_connection,
            receive_budget=self.receive_budget,
            max_fds=resources.max_fds_per_connection,
            tls_handshake_timeout=self.handshake_timeout,
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
                try:
                    listener = await open_listener(address, self._options(address))
                except (OSError, TransportConnectError) as exc:
                    cause = exc if isinstance(exc, OSError) else exc.__cause__
                    if not isinstance(cause, OSError):
                        raise  # already says what to do
                    raise TransportConnectError(
                        f"cannot listen on {address}: {reason(cause)}; {listen_hint(cause)}"
                    ) from exc
                self.listeners.append(listener)
                self._set_socket_mode(listener.address)
                log.debug("listening on %s", listener.address)
            self._adopt_host_state()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for dev in self.registry:
                    self.start_device(dev)
                for listener in self.listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                nursery.start_soon(self._tick_logs_forever, name="rate-limited log summaries")
                if self.control_path is not None:
                    from pciback.ops.control_server import serve_control

                    await nursery.start(serve_control, self, self.control_path)
                self.started_at = trio.current_time()
                task_status.started([lst.address for lst in self.listeners])
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                # First stop listening: a guest reconnecting must not reach a backend
                # that is going away. A listener that fails to close skips nothing.
                for listener in self.listeners:
                    try:
                        await listener.aclose()
                    except Exception:  # logged with its traceback
                        log.exception("closing the listener on %s failed", listener.address)
                # Shutdown is a release too: nothing a guest wrote outlives the service
                # (a writable host device gets its saved config back). Every device is
                # reset even if another's reset fails (reset_device never raises).
                for dev in self.registry:
                    if dev.guest is not None or dev.leaving is not None:
                        await self.reset_device(dev, "the backend stopped")
                if self.host_state is not None:
                    self.host_state.release(self.writable_host_devices())

    def start_device(self, dev: ServedDevice) -> None:
        """Give ``dev`` its runtime (tasks, IRQ sink, DMA path) if serving and not yet done."""
        if dev.runtime is None and self._nursery is not None:
            dev.start(self._nursery, interrupts=self.irq.device(dev), dma=self.dma.device(dev))

    def writable_host_devices(self) -> list[HostDevice]:
        """The host devices guests may write to (their saved config is restored on release)."""
        return [
            dev.provider
            for dev in self.registry
            if isinstance(dev.provider, HostDevice) and dev.provider.writable
        ]

    def _adopt_host_state(self) -> None:
        """Before any guest connects: restore what a killed backend left; record ours."""
        if self.host_state is None:
            if self.writable_host_devices():
                log.warning(
                    "no control socket, so no state file: if this backend is killed with "
                    "SIGKILL, the next one cannot restore its writable host devices' config"
                )
            return
        restored = set(self.host_state.adopt(self.writable_host_devices()))
        for dev in self.registry:
            if dev.physical is not None and str(dev.physical) in restored:
                # The device's policy and firmware programming go on top of the restored config.
                self.registry.reset(dev, "its config was restored after an unclean stop")

    def _set_socket_mode(self, address: str) -> None:
        """Apply ``listen_mode``/``listen_group`` to a unix:/shm: socket file."""
        scheme, rest = split_address(address)
        if scheme.name not in ("unix", "shm"):
            return
        try:
            os.chmod(rest, self.config.listen_mode)
            if self.config.listen_group is not None:
                os.chown(rest, -1, self.config.listen_group)
        except OSError as exc:
            raise ConfigFileError(
                f"listen_mode/listen_group: cannot set mode {self.config.listen_mode:04o} "
                f"group {self.config.listen_group} on {address}: {exc.strerror or exc}"
            ) from exc

    async def _accept_loop(self, listener: FrameListener, nursery: trio.Nursery) -> None:
        def handle(transport: FrameTransport) -> None:
            self.stats.connections_accepted += 1
            nursery.start_soon(self._serve_connection, transport, listener.address)

        def on_bug() -> None:
            self.stats.accept_failures += 1

        await accept_loop(listener, handle, self.stats.accept, on_bug=on_bug)

    async def _serve_connection(self, transport: FrameTransport, address: str) -> None:
        """One connection's task tree, and the net under it (see the module docstring).

        Everything that can wait on the peer happens here, in its own task: the
        limits' gate, the TLS handshake, the Hello.
        """
        self.stats.connections_active += 1
        peer = f"connection {self.stats.connections_accepted} on {address}"
        scope = f"source {address}"
        ticket: GateTicket | None = None

        def note(level: int, msg: str, *args: object) -> None:
            # What a peer's comings and goings cause is rate-limited per source, so a
            # peer connecting and leaving in a loop cannot grow the log (counted).
            self.guest_log.log(scope, "connections", level, msg, *args)

        try:
            peer = transport.describe()  # a plugin's describe() may fail: inside the net
            source = source_of(transport.peer_identity())
            scope = f"source {source}"
            ticket = self.gate.admit(source)
            if ticket is None:
                await trio.aclose_forcefully(transport)
                return
            await self._run_connection(transport, address, ticket)
        except (trio.BrokenResourceError, trio.EndOfChannel, trio.ClosedResourceError) as exc:
            cause = exc.__cause__
            if isinstance(cause, LimitExceededError):
                self.stats.disconnects_for_misbehaviour += 1
                self.gate.exceeded(cause.limit, "%s: disconnected: %s", peer, exc)
            elif isinstance(exc, EventfdStalledError) or isinstance(
                exc.__cause__, (RemoteProtocolError, EventfdStalledError)
            ):
                # The transport caught the peer lying about framing (e.g. a 1 GiB length).
                self.stats.disconnects_for_misbehaviour += 1
                note(logging.WARNING, "%s: disconnected: %s", peer, exc)
            elif isinstance(cause, ssl.SSLError):
                # Say which TLS failure it was (no client certificate, an unknown CA, ...).
                note(logging.WARNING, "%s: TLS handshake failed: %s", peer, reason(cause))
            else:
                note(logging.INFO, "%s: peer went away: %s", peer, reason(cause or exc))
        except RemoteProtocolError as exc:
            self.stats.disconnects_for_misbehaviour += 1
            note(logging.WARNING, "%s: disconnected for a protocol violation: %s", peer, exc)
        except trio.TooSlowError:
            self.stats.disconnects_for_misbehaviour += 1
            self.gate.exceeded(
                "handshake_timeout", "%s: no handshake within %.1f s; disconnected",
                peer, self.handshake_timeout,
            )
        except Exception:  # noqa: BLE001 - the net: _contain logs and counts it
            self._contain(peer, "the connection")
        finally:
            self.stats.connections_active -= 1
            if ticket is not None:
                self.gate.release(ticket)
            with trio.CancelScope(shield=True):
                try:
                    await transport.aclose()
                except Exception:  # noqa: BLE001 - _contain logs and counts it
                    self._contain(peer, "closing the transport")

    def _contain(self, peer: str, what: str) -> None:
        """Log (once, with the traceback, at error level) and count a contained failure."""
        self.stats.connections_crashed += 1
        log.exception(
            "%s: %s failed unexpectedly (a bug); this connection is closed and the backend "
            "goes on serving the others",
            peer,
            what,
        )

    async def _run_connection(
        self, transport: FrameTransport, address: str, ticket: GateTicket
    ) -> None:
        # The whole handshake (TLS, Hello, shm setup) is one time budget.
        with trio.fail_after(self.handshake_timeout):
            conn = await server_handshake(
                transport,
                address,
                ticket,
                config=self.config,
                gate=self.gate,
                guest_log=self.guest_log,
                stats=self.stats,
            )
        if conn is None:
            return
        guest = conn.guest
        assert guest is not None
        # A guest reconnecting in a loop: rate-limited per guest like its other lines.
        self.guest_log.log(
            f"guest {guest}", "connections", logging.INFO,
            "%s: guest %s connected", transport.describe(), guest,
        )
        session = GuestSession(
            transport,
            conn,
            number=next(self._session_numbers),
            guest_log=self.guest_log,
            max_fds=self.config.resources.max_fds_per_connection,
            registry=self.registry,
            router=self.irq,
            dma=self.dma.space(guest),
            backend_stats=self.stats,
            fair=self.fair,
        )
        self.sessions.append(session)
        try:
            await session.run()
        finally:
            self.sessions.remove(session)
            # A cancelled task here means the backend is stopping: serve() resets every
            # device once its tasks are done, so this connection must not hold that up.
            stopping = trio.current_effective_deadline() == -math.inf
            if not stopping and not self.sessions_of(guest):
                # The guest's last connection ended (goodbye, crash, kill -9): whatever it
                # wrote must not reach whoever connects next (XSA-306).
                for dev in self.registry.devices_of(guest):
                    await self.reset_device(dev, f"guest {guest} disconnected")
